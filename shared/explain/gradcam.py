"""Grad-CAM and Grad-CAM++ heatmaps for timm CNN classifiers, batched, with the target layer found automatically."""

from __future__ import annotations

import difflib
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import ModelError

Method = Literal["gradcam", "gradcam++"]
METHODS: tuple[str, ...] = ("gradcam", "gradcam++")
PROBE_SIZE = 128
"""Side of the blank image run once to find the last spatial feature layer (4 x 4 maps at stride 32)."""


def _module_names(model: nn.Module) -> dict[nn.Module, str]:
    names: dict[nn.Module, str] = {}
    for name, module in model.named_modules():
        names.setdefault(module, name)
    return names


def find_target_layer(model: nn.Module) -> str:
    """Name of the module that outputs the model's last spatial feature map (what global pooling reduces).

    One blank image runs through the model and every module's output is watched; the module
    finishing last with a 4-D output wider than 1 x 1 is the last convolutional feature layer
    (timm's `bn2` in EfficientNets, `layer4` in ResNets, `stages.3` in ConvNeXts). Pooled 1 x 1
    maps (MobileNetV3's `conv_head`) and token sequences (vision transformers) do not qualify.
    """
    names = _module_names(model)
    finished: list[str] = []

    token_outputs_after: list[bool] = []

    def watch(module: nn.Module, _inputs, output) -> None:
        if not isinstance(output, torch.Tensor):
            return
        if output.ndim == 4 and output.shape[-1] > 1 and output.shape[-2] > 1:
            finished.append(names[module])
            token_outputs_after.append(False)
        elif output.ndim == 3 and token_outputs_after:
            # A token sequence after the last map: the maps were attention internals, not features.
            token_outputs_after[-1] = True

    handles = [module.register_forward_hook(watch) for module in names if module is not model]
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            try:
                model(torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE, device=device, dtype=dtype))
            except (RuntimeError, AssertionError, ValueError):
                # Fixed-size models (vision transformers) only take their own input size.
                finished.clear()
                token_outputs_after.clear()
                side = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))[-2:]
                model(torch.zeros(1, 3, *side, device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if not finished or token_outputs_after[-1]:
        raise ModelError(
            f"{type(model).__name__} has no layer with a spatial feature map, so Grad-CAM cannot explain it; "
            "use a convolutional timm model (e.g. tf_efficientnet_lite0, resnet18, convnext_atto)"
        )
    return finished[-1]


def _resolve_layer(model: nn.Module, target_layer: nn.Module | str | None) -> tuple[nn.Module, str]:
    if target_layer is None:
        target_layer = find_target_layer(model)
    if isinstance(target_layer, str):
        try:
            return model.get_submodule(target_layer), target_layer
        except AttributeError:
            known = [name for name, _ in model.named_modules() if name]
            close = difflib.get_close_matches(target_layer, known, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else "leave it out to use the last feature layer"
            raise ModelError(f"the model has no layer named {target_layer!r}; {hint}") from None
    if isinstance(target_layer, nn.Module):
        name = _module_names(model).get(target_layer)
        if name is None:
            raise ModelError("the target layer given is not a module of this model; pass one of model.modules() or its name")
        return target_layer, name
    raise ModelError(f"target_layer must be a module, a module name or None, not {type(target_layer).__name__}")


def _channel_weights(activations: torch.Tensor, gradients: torch.Tensor, method: str) -> torch.Tensor:
    """Per-channel weights [N, C] of the feature maps: mean gradient (Grad-CAM) or the Grad-CAM++ alphas."""
    if method == "gradcam":
        return gradients.mean(dim=(2, 3))
    # Grad-CAM++ (Chattopadhyay et al. 2018) with the exponential-score closed form of the alphas.
    squared, cubed = gradients.pow(2), gradients.pow(3)
    activation_sums = activations.sum(dim=(2, 3), keepdim=True)
    denominator = 2 * squared + activation_sums * cubed
    alphas = torch.where(gradients != 0, squared / torch.where(denominator != 0, denominator, torch.ones_like(denominator)), 0)
    return (alphas * F.relu(gradients)).sum(dim=(2, 3))


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map [N, H, W] to [0, 1]; a flat map becomes all zeros."""
    flat = maps.flatten(1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    span = (high - low)[:, None, None]
    scaled = (maps - low[:, None, None]) / torch.where(span > 1e-12, span, torch.ones_like(span))
    return torch.where(span > 1e-12, scaled, torch.zeros_like(scaled))


class GradCam:
    """Class-activation heatmaps of a classifier (Grad-CAM or Grad-CAM++) for batches of normalised images.

    Use as a context manager, or call `close()`, to remove the hook it places on the target layer.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: nn.Module | str | None = None,
        method: Method = "gradcam",
        batch_size: int = 32,
    ) -> None:
        if method not in METHODS:
            raise ModelError(f"Grad-CAM method {method!r} is not one of {', '.join(METHODS)}")
        if batch_size < 1:
            raise ModelError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.method = method
        self.batch_size = batch_size
        self.target_layer, self.target_layer_name = _resolve_layer(model, target_layer)
        self._activations: torch.Tensor | None = None
        self._handle = self.target_layer.register_forward_hook(self._keep_activations)

    def _keep_activations(self, _module: nn.Module, _inputs, output) -> None:
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            raise ModelError(
                f"layer {self.target_layer_name!r} outputs {type(output).__name__} "
                f"{tuple(getattr(output, 'shape', ()))}, not a feature map [N, C, H, W]; choose a convolutional layer"
            )
        self._activations = output

    def close(self) -> None:
        """Remove the hook from the target layer (idempotent)."""
        if getattr(self, "_handle", None) is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> GradCam:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __call__(self, images: torch.Tensor, class_indices: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Heatmaps [N, H, W] in [0, 1] (float32) and class probabilities [N, K] of normalised images [N, 3, H, W].

        `class_indices` picks the class each map explains; by default the predicted class.
        """
        maps, probabilities = self.explain_tensors(images, class_indices)
        return maps.numpy(), probabilities.numpy()

    def explain_tensors(
        self, images: torch.Tensor, class_indices: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `__call__`, as float32 CPU tensors."""
        if self._handle is None:
            raise ModelError("this GradCam was closed; create a new one")
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            raise ModelError(f"images must be a tensor [N, 3, H, W] of normalised RGB images, got {tuple(getattr(images, 'shape', ()))}")
        if class_indices is not None:
            class_indices = torch.as_tensor(class_indices, dtype=torch.long).reshape(-1)
            if class_indices.numel() != images.shape[0]:
                raise ModelError(f"{class_indices.numel()} class indices for {images.shape[0]} images; give one per image or none")
        maps, probabilities = [], []
        for start in range(0, images.shape[0], self.batch_size):
            chunk = images[start : start + self.batch_size]
            chosen = None if class_indices is None else class_indices[start : start + self.batch_size]
            chunk_maps, chunk_probabilities = self._explain_batch(chunk, chosen)
            maps.append(chunk_maps)
            probabilities.append(chunk_probabilities)
        return torch.cat(maps), torch.cat(probabilities)

    def _explain_batch(self, images: torch.Tensor, class_indices: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        parameter = next(self.model.parameters())
        # Gradients flow from the input even when the weights are frozen.
        inputs = images.detach().to(device=parameter.device, dtype=parameter.dtype).requires_grad_(True)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                logits = self.model(inputs)
                activations = self._activations
                self._activations = None
                if activations is None:
                    raise ModelError(f"layer {self.target_layer_name!r} did not run in the forward pass; pick a layer the model uses")
                if logits.ndim != 2:
                    raise ModelError(f"the model outputs shape {tuple(logits.shape)}, not class scores [N, K]; explain a classifier")
                if class_indices is None:
                    class_indices = logits.argmax(dim=1)
                class_indices = class_indices.to(logits.device)
                if class_indices.min() < 0 or class_indices.max() >= logits.shape[1]:
                    raise ModelError(f"class indices must lie in 0..{logits.shape[1] - 1}, got {class_indices.tolist()}")
                # Images are independent in eval mode, so one backward pass gives every image's gradient.
                scores = logits.gather(1, class_indices[:, None]).sum()
                (gradients,) = torch.autograd.grad(scores, activations)
        finally:
            self.model.train(was_training)
        activations, gradients = activations.detach().float(), gradients.detach().float()
        weights = _channel_weights(activations, gradients, self.method)
        cams = F.relu((weights[:, :, None, None] * activations).sum(dim=1, keepdim=True))
        cams = F.interpolate(cams, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        probabilities = torch.softmax(logits.detach().float(), dim=1)
        return normalise_maps(cams).cpu(), probabilities.cpu()


def jet_colours(values: np.ndarray) -> np.ndarray:
    """Jet-like colours (blue - cyan - yellow - red) uint8 [..., 3] of values in [0, 1]."""
    values = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25], dtype=np.float32)  # red, green, blue peaks
    colours = np.clip(1.5 - np.abs(4.0 * (values - centres)), 0.0, 1.0)
    return (colours * 255 + 0.5).astype(np.uint8)


def resize_heatmap(heatmap: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a heatmap [h, w] to [height, width], float32."""
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.shape == (height, width):
        return heatmap
    resized = F.interpolate(torch.from_numpy(heatmap)[None, None], size=(height, width), mode="bilinear", align_corners=False)
    return resized[0, 0].numpy()


def overlay_heatmap(rgb: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The RGB image uint8 [H, W, 3] blended with the jet-coloured heatmap (resized to the image), uint8 [H, W, 3]."""
    rgb = np.asarray(rgb)
    heatmap = np.asarray(heatmap)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"the image must be RGB [H, W, 3], got shape {rgb.shape}")
    if heatmap.ndim != 2:
        raise ValueError(f"the heatmap must be 2-D [h, w], got shape {heatmap.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha} must lie in [0, 1] (0: image only, 1: heatmap only)")
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    colours = jet_colours(resize_heatmap(heatmap, rgb.shape[0], rgb.shape[1])).astype(np.float32)
    blended = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colours
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)
