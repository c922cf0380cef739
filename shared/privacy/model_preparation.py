"""Making a model trainable under DP-SGD: GroupNorm for BatchNorm, no in-place ops, per-sample-gradient mode."""

from __future__ import annotations

import math

import torch
from torch import nn

from shared.errors import ModelError

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost")
GROUP_NORM_MAX_GROUPS = 32
"""Wu & He's default group count; the count used is gcd(32, channels) so every channel count divides."""

PREPARED_MARKER = "skin_fl_private_ready"
"""Attribute set on a prepared model, so preparing twice is a no-op."""


def _timm_norm_act_classes() -> tuple[type, type]:
    from timm.layers.norm_act import BatchNormAct2d, GroupNormAct

    return BatchNormAct2d, GroupNormAct


def _group_count(channels: int) -> int:
    return math.gcd(GROUP_NORM_MAX_GROUPS, channels)


def _group_norm_for(batch_norm: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A GroupNorm (timm's GroupNormAct for BatchNormAct2d, keeping its activation) in place of `batch_norm`.

    The affine scale and shift are copied: pretrained weights then keep their per-channel
    scale and shift, a better start than ones and zeros.
    """
    batch_norm_act, group_norm_act = _timm_norm_act_classes()
    channels = batch_norm.num_features
    if isinstance(batch_norm, batch_norm_act):
        replacement = group_norm_act(
            channels, num_groups=_group_count(channels), eps=batch_norm.eps, affine=batch_norm.affine, apply_act=False
        )
        replacement.drop = batch_norm.drop
        replacement.act = batch_norm.act
    else:
        replacement = nn.GroupNorm(_group_count(channels), channels, eps=batch_norm.eps, affine=batch_norm.affine)
    if batch_norm.affine:
        with torch.no_grad():
            replacement.weight.copy_(batch_norm.weight)
            replacement.bias.copy_(batch_norm.bias)
    return replacement.to(device=batch_norm.weight.device if batch_norm.affine else None)


def replace_batch_norm(model: nn.Module) -> int:
    """Swap every BatchNorm (timm's BatchNormAct2d included) for a GroupNorm in place; returns how many."""
    replaced = 0
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, _group_norm_for(child))
            replaced += 1
        else:
            replaced += replace_batch_norm(child)
    return replaced


def _out_of_place_resnet_blocks() -> dict[type, type]:
    """timm ResNet blocks whose residual add `x += shortcut` is made out of place.

    Opacus's backward hooks make a layer's output a view that must not be modified in place,
    and timm 1.0.31's BasicBlock and Bottleneck add the shortcut in place into the output of
    their last norm layer. These subclasses differ only in `x = x + shortcut`, so weights and
    state-dict names stay the same.
    """
    from timm.models.resnet import BasicBlock, Bottleneck

    class OutOfPlaceBasicBlock(BasicBlock):
        """timm BasicBlock with an out-of-place residual add."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shortcut = x
            x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
            x = self.bn2(self.conv2(x))
            if self.se is not None:
                x = self.se(x)
            if self.drop_path is not None:
                x = self.drop_path(x)
            if self.downsample is not None:
                shortcut = self.downsample(shortcut)
            return self.act2(x + shortcut)

    class OutOfPlaceBottleneck(Bottleneck):
        """timm Bottleneck with an out-of-place residual add."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shortcut = x
            x = self.act1(self.bn1(self.conv1(x)))
            x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
            x = self.bn3(self.conv3(x))
            if self.se is not None:
                x = self.se(x)
            if self.drop_path is not None:
                x = self.drop_path(x)
            if self.downsample is not None:
                shortcut = self.downsample(shortcut)
            return self.act3(x + shortcut)

    return {BasicBlock: OutOfPlaceBasicBlock, Bottleneck: OutOfPlaceBottleneck}


def disable_in_place_operations(model: nn.Module) -> int:
    """Turn off in-place activations and timm ResNet's in-place residual add; returns modules changed."""
    swaps = _out_of_place_resnet_blocks()
    changed = 0
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
            changed += 1
        if type(module) in swaps:
            module.__class__ = swaps[type(module)]
            changed += 1
    return changed


FASTEST_GRAD_SAMPLE_MODE = {
    "tf_efficientnet_lite0": "hooks",
    "efficientnet_b0": "hooks",
    "resnet18": "hooks",
}
"""Per-sample-gradient mode per architecture, from `python -m simulation.privacy_benchmark --modes`.

Measured s/step (64 px, batch 16, fp32, idle 2-core CPU; plain / hooks / functorch / ghost), with
this project's samplers for hooks (`shared.privacy.per_sample_gradients`): lite0 0.114 / 0.259 /
0.434 / 0.328, efficientnet_b0 0.140 / 0.304 / 0.527 / 0.397, resnet18 0.143 / 0.450 / 0.779 /
0.640. Unmeasured architectures get functorch, which handles every layer type.
"""
DEFAULT_GRAD_SAMPLE_MODE = "functorch"


def grad_sample_mode_for(architecture: str, requested: str = "auto") -> str:
    """The per-sample-gradient mode to use: `requested`, or for 'auto' the one measured fastest."""
    if requested != "auto":
        if requested not in GRAD_SAMPLE_MODES:
            raise ModelError(f"per-sample-gradient mode {requested!r} is not one of auto, {', '.join(GRAD_SAMPLE_MODES)}")
        return requested
    return FASTEST_GRAD_SAMPLE_MODE.get(architecture, DEFAULT_GRAD_SAMPLE_MODE)


TRAINABLE_STAGES_MARKER = "skin_fl_trainable_stages"
"""Attribute holding how many feature stages (and the head) a prepared model trains; None = all."""


def _module_order(model: nn.Module) -> dict[str, int]:
    return {name: index for index, (name, _) in enumerate(model.named_modules())}


def frozen_module_names(model: nn.Module, trainable_stages: int | None) -> set[str]:
    """Names of the modules before the last `trainable_stages` feature stages (timm's feature_info) and the head.

    0 trains the classification layer only (a linear probe of the pretrained features: for
    EfficientNets the 1x1 head convolution before it stays frozen too); None, or as many stages
    as the model has, trains everything.
    """
    if trainable_stages is None:
        return set()
    if trainable_stages == 0:
        classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
        names = [name for name, module in model.named_modules() if module is classifier]
        if not names:
            raise ModelError(f"{type(model).__name__} names no classification layer; train some stages (trainable_stages >= 1)")
        return {name for name, _ in model.named_modules() if name and not (name == names[0] or name.startswith(names[0] + "."))}
    stages = [info["module"] for info in getattr(model, "feature_info", [])]
    if not stages:
        raise ModelError(f"{type(model).__name__} lists no feature stages; train the whole network under DP (trainable_stages unset)")
    if trainable_stages >= len(stages):
        return set()
    last_frozen = stages[len(stages) - trainable_stages - 1]
    order = _module_order(model)
    cut = max(index for name, index in order.items() if name == last_frozen or name.startswith(last_frozen + "."))
    return {name for name, index in order.items() if 0 < index <= cut}


def _replace_module(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)


def freeze_early_layers(model: nn.Module, trainable_stages: int | None) -> int:
    """Freeze every parameter before the last `trainable_stages` stages; their BatchNorms keep the learnt statistics.

    A frozen BatchNorm with fixed statistics treats every image alone (no batch statistics), so it
    needs no GroupNorm, and pretrained features stay as they were learnt. Returns the parameters frozen.
    """
    from timm.layers import freeze_batch_norm_2d

    frozen = frozen_module_names(model, trainable_stages)
    batch_norms = [(name, module) for name, module in model.named_modules() if name in frozen and isinstance(module, nn.modules.batchnorm._BatchNorm)]
    for name, module in batch_norms:
        _replace_module(model, name, freeze_batch_norm_2d(module))
    count = 0
    for name, parameter in model.named_parameters():
        owner = name.rpartition(".")[0]
        if owner in frozen and parameter.requires_grad:
            parameter.requires_grad_(False)
            count += parameter.numel()
    return count


def zero_classifier(model: nn.Module) -> None:
    """Start the classification layer at zero (a linear probe's usual start).

    timm initialises it at a scale (lite0: uniform within 1/sqrt(classes)) that the small, clipped
    and noised steps of DP-SGD take many rounds to move away from; measured on HAM10000 at 128 px,
    the same no-noise head recipe reached 0.23 balanced accuracy from timm's start, 0.49 from zero.
    """
    with torch.no_grad():
        for parameter in model.get_classifier().parameters():
            parameter.zero_()


def prepare_for_private_training(model: nn.Module, trainable_stages: int | None = None) -> nn.Module:
    """Make `model` trainable under DP-SGD in place and check it with Opacus.

    With `trainable_stages` only the last that many feature stages and the head are trained; the
    layers before are frozen with their pretrained BatchNorm statistics (0: the head alone,
    started at zero). Every BatchNorm left
    in a trained part becomes GroupNorm; in-place operations are turned off. Raises ModelError
    naming the layers Opacus cannot train privately. Preparing twice the same way is a no-op.
    """
    from opacus.validators import ModuleValidator

    if getattr(model, PREPARED_MARKER, False):
        if getattr(model, TRAINABLE_STAGES_MARKER, None) != trainable_stages:
            raise ModelError(
                f"the model was prepared for DP-SGD training {getattr(model, TRAINABLE_STAGES_MARKER, None)} stages, "
                f"not {trainable_stages}; build a fresh model"
            )
        return model
    freeze_early_layers(model, trainable_stages)
    if trainable_stages == 0:
        zero_classifier(model)
    replace_batch_norm(model)
    disable_in_place_operations(model)
    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        listed = "; ".join(str(problem) for problem in problems[:5])
        raise ModelError(
            f"{type(model).__name__} cannot be trained with DP-SGD after preparation ({listed}); choose an "
            "architecture without such layers, e.g. tf_efficientnet_lite0, efficientnet_b0 or resnet18"
        )
    setattr(model, PREPARED_MARKER, True)
    setattr(model, TRAINABLE_STAGES_MARKER, trainable_stages)
    return model


def is_prepared_for_privacy(model: nn.Module) -> bool:
    """Whether `prepare_for_private_training` changed this model (its weights then fit only prepared models)."""
    return bool(getattr(model, PREPARED_MARKER, False))


def prepared_trainable_stages(model: nn.Module) -> int | None:
    """The `trainable_stages` a prepared model was prepared with (None: the whole network)."""
    return getattr(model, TRAINABLE_STAGES_MARKER, None)
