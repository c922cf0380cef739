"""Faster exact per-sample gradients for Opacus's hooks mode: pointwise and depthwise convolutions, GroupNorm+act."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import ModelError

_registered = False


def _conv_bias(layer: nn.Conv2d, backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    if layer.bias is not None and layer.bias.requires_grad:
        return {layer.bias: backprops.sum(dim=(2, 3))}
    return {}


def _is_pointwise(layer: nn.Conv2d, padding: tuple[int, int]) -> bool:
    return layer.kernel_size == (1, 1) and layer.groups == 1 and padding == (0, 0)


def _is_depthwise(layer: nn.Conv2d) -> bool:
    return layer.groups == layer.in_channels == layer.out_channels and layer.groups > 1


def _with_explicit_padding(layer: nn.Conv2d, inputs: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """The inputs and the symmetric padding to convolve them with; 'same' and 'valid' padding resolved."""
    if not isinstance(layer.padding, str):
        return inputs, tuple(layer.padding)
    if layer.padding == "valid":
        return inputs, (0, 0)
    pads = []
    for kernel, dilation in zip(reversed(layer.kernel_size), reversed(layer.dilation)):
        total = dilation * (kernel - 1)
        pads += [total // 2, total - total // 2]
    return F.pad(inputs, pads), (0, 0)


def pointwise_conv_per_sample_gradients(layer: nn.Conv2d, inputs: torch.Tensor, backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """1x1 convolution: each image's weight gradient is one matrix product of its output gradients and inputs."""
    stride_h, stride_w = layer.stride
    inputs = inputs[:, :, ::stride_h, ::stride_w]
    gradients = _conv_bias(layer, backprops)
    if layer.weight.requires_grad:
        weight = torch.einsum("nohw,nihw->noi", backprops, inputs)
        gradients[layer.weight] = weight.reshape(len(inputs), *layer.weight.shape)
    return gradients


def _overlap(offset: int, stride: int, size: int, out_size: int) -> tuple[slice, slice] | None:
    """The input and output index slices where a kernel tap at `offset` reads the image, not its zero padding."""
    first = (-offset + stride - 1) // stride if offset < 0 else 0
    last = min(out_size - 1, (size - 1 - offset) // stride)
    if last < first:
        return None
    start = first * stride + offset
    return slice(start, start + (last - first) * stride + 1, stride), slice(first, last + 1)


def depthwise_conv_per_sample_gradients(
    layer: nn.Conv2d, inputs: torch.Tensor, backprops: torch.Tensor, padding: tuple[int, int]
) -> dict[nn.Parameter, torch.Tensor]:
    """Depthwise convolution: one multiply-and-sum over the output per kernel tap, channel by channel.

    Opacus's general convolution sampler computes every channel against every channel and keeps
    the diagonal (channels x more work); this costs what the forward convolution costs.
    """
    gradients = _conv_bias(layer, backprops)
    if not layer.weight.requires_grad:
        return gradients
    (kernel_h, kernel_w), (stride_h, stride_w) = layer.kernel_size, layer.stride
    (dilation_h, dilation_w), (padding_h, padding_w) = layer.dilation, padding
    height, width = inputs.shape[2], inputs.shape[3]
    out_h, out_w = backprops.shape[2], backprops.shape[3]
    weight = torch.zeros(len(inputs), layer.out_channels, kernel_h, kernel_w, dtype=backprops.dtype, device=backprops.device)
    for row in range(kernel_h):
        rows = _overlap(row * dilation_h - padding_h, stride_h, height, out_h)
        for column in range(kernel_w):
            columns = _overlap(column * dilation_w - padding_w, stride_w, width, out_w)
            if rows is None or columns is None:
                continue  # this tap only ever sees the zero padding
            window = inputs[:, :, rows[0], columns[0]]
            weight[:, :, row, column] = (window * backprops[:, :, rows[1], columns[1]]).sum(dim=(2, 3))
    gradients[layer.weight] = weight.unsqueeze(2)
    return gradients


def unfolded_conv_per_sample_gradients(
    layer: nn.Conv2d, inputs: torch.Tensor, backprops: torch.Tensor, padding: tuple[int, int]
) -> dict[nn.Parameter, torch.Tensor]:
    """Any convolution: image patches (torch's unfold, any memory layout) times output gradients, group by group.

    Opacus 1.6's own sampler reads patches with strides that assume a contiguous NCHW layout; on
    channels-last tensors (how this project trains) it returns wrong gradients.
    """
    gradients = _conv_bias(layer, backprops)
    if not layer.weight.requires_grad:
        return gradients
    count, groups = len(inputs), layer.groups
    patches = F.unfold(inputs, layer.kernel_size, dilation=layer.dilation, padding=padding, stride=layer.stride)
    patches = patches.reshape(count, groups, -1, patches.shape[-1])
    outputs = backprops.reshape(count, groups, -1, patches.shape[-1])
    weight = torch.einsum("ngol,ngpl->ngop", outputs, patches)
    gradients[layer.weight] = weight.reshape(count, *layer.weight.shape)
    return gradients


def conv2d_per_sample_gradients(layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a Conv2d (exact for every kernel, stride, dilation, padding and grouping)."""
    if layer.padding_mode != "zeros":
        raise ModelError(f"{layer} pads with {layer.padding_mode!r}, which the hooks-mode samplers do not replay; use grad_sample_mode functorch")
    inputs = activations[0].to(backprops.dtype)
    if len(inputs) == 0:
        gradients = {layer.weight: torch.zeros_like(layer.weight).unsqueeze(0)} if layer.weight.requires_grad else {}
        return gradients | _conv_bias(layer, backprops)
    inputs, padding = _with_explicit_padding(layer, inputs)
    if _is_pointwise(layer, padding):
        return pointwise_conv_per_sample_gradients(layer, inputs, backprops)
    if _is_depthwise(layer):
        return depthwise_conv_per_sample_gradients(layer, inputs, backprops, padding)
    return unfolded_conv_per_sample_gradients(layer, inputs, backprops, padding)


def conv2d_same_per_sample_gradients(layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """timm's Conv2dSame (TensorFlow 'same' padding, then an unpadded convolution): pad as it does, then as Conv2d."""
    from timm.layers.padding import pad_same

    padded = pad_same(activations[0], layer.weight.shape[-2:], layer.stride, layer.dilation)
    return conv2d_per_sample_gradients(layer, [padded], backprops)


def _activation_backward(activation: nn.Module, before: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """The gradient at an elementwise activation's input, given its input and the gradient at its output."""
    if isinstance(activation, nn.Identity):
        return gradient
    if isinstance(activation, nn.Hardtanh):  # ReLU6 included
        return torch.ops.aten.hardtanh_backward(gradient, before, activation.min_val, activation.max_val)
    if isinstance(activation, nn.ReLU):
        return torch.ops.aten.threshold_backward(gradient, before, 0)
    if isinstance(activation, nn.SiLU):
        return torch.ops.aten.silu_backward(gradient, before)
    with torch.enable_grad():
        before = before.detach().requires_grad_()
        (gradient,) = torch.autograd.grad(activation(before), before, gradient)
    return gradient


def group_norm_act_per_sample_gradients(layer: nn.GroupNorm, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """timm's GroupNormAct (GroupNorm, then an elementwise activation): the activation's backward, then GroupNorm's rule.

    Its dropout must be the identity (a random mask could not be replayed); prepared models have none.
    """
    if not isinstance(layer.drop, nn.Identity):
        raise ModelError(f"{type(layer).__name__} with dropout {layer.drop} has no exact per-sample gradients; use grad_sample_mode functorch")
    inputs = activations[0].to(backprops.dtype)
    normalised = F.group_norm(inputs, layer.num_groups, eps=layer.eps)
    before = torch.addcmul(layer.bias.detach()[:, None, None], normalised, layer.weight.detach()[:, None, None])
    backprops = _activation_backward(layer.act, before, backprops)
    gradients = {}
    if layer.weight.requires_grad:
        gradients[layer.weight] = (normalised * backprops).sum(dim=(2, 3))
    if layer.bias is not None and layer.bias.requires_grad:
        gradients[layer.bias] = backprops.sum(dim=(2, 3))
    return gradients


def _store_per_sample_gradients(*, param: torch.Tensor, grad_sample: torch.Tensor, max_batch_len: int) -> None:
    """Opacus's `create_or_accumulate_grad_sample` without a zero-filled copy when the gradients already fill the batch.

    Opacus 1.6 allocates a zeroed [batch, *parameter] tensor and copies every layer's per-sample
    gradients into it: two extra passes over the largest tensors of a DP step (for
    tf_efficientnet_lite0 at batch 32, 32 x 3.4 M floats). The samplers return fresh tensors,
    so they can be kept as they are; anything else (accumulation, a short batch) goes the
    original way.
    """
    if param.requires_grad and not hasattr(param, "_current_grad_sample") and grad_sample.shape[0] == max_batch_len:
        param._current_grad_sample = grad_sample
        return
    _OPACUS_STORE(param=param, grad_sample=grad_sample, max_batch_len=max_batch_len)


_OPACUS_STORE = None


def install_fast_per_sample_gradients() -> None:
    """Make Opacus's hooks mode use these samplers for Conv2d, timm's Conv2dSame and GroupNormAct, without copies.

    Process-wide and idempotent. Exactness against one backward per image is tested for every
    offered architecture; the pinned opacus (1.6.0) is the version the storage shortcut was written for.
    """
    global _registered, _OPACUS_STORE
    if _registered:
        return
    from opacus.grad_sample import grad_sample_module
    from opacus.grad_sample.utils import register_grad_sampler
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.norm_act import GroupNormAct

    register_grad_sampler(nn.Conv2d)(conv2d_per_sample_gradients)
    register_grad_sampler(Conv2dSame)(conv2d_same_per_sample_gradients)
    register_grad_sampler(GroupNormAct)(group_norm_act_per_sample_gradients)
    _OPACUS_STORE = grad_sample_module.create_or_accumulate_grad_sample
    grad_sample_module.create_or_accumulate_grad_sample = _store_per_sample_gradients
    _registered = True
