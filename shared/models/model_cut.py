"""A classifier cut in two: a frozen bottom whose activations are computed once, and the top a refit trains."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from shared.errors import ModelError

RefitLayers = Literal["last-stage", "classification-layer"]


class _Bottom(nn.Module):
    """The model's layers below the cut, as one module (always run in eval mode by its callers)."""

    def __init__(self, model: nn.Module, layers: RefitLayers) -> None:
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        model = self.model
        if self.layers == "classification-layer":
            return model.forward_head(model.forward_features(images), pre_logits=True)
        if _is_efficientnet(model):
            activations = model.bn1(model.conv_stem(images))
            for block in model.blocks[:-1]:
                activations = block(activations)
            return activations
        activations = model.maxpool(model.act1(model.bn1(model.conv1(images))))
        return model.layer3(model.layer2(model.layer1(activations)))


class _Top(nn.Module):
    """The model's layers above the cut: activations of the bottom in, logits out."""

    def __init__(self, model: nn.Module, layers: RefitLayers) -> None:
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        model = self.model
        if self.layers == "classification-layer":
            return model.get_classifier()(activations)
        if _is_efficientnet(model):
            return model.forward_head(model.bn2(model.conv_head(model.blocks[-1](activations))))
        return model.forward_head(model.layer4(activations))


def _is_efficientnet(model: nn.Module) -> bool:
    return all(hasattr(model, name) for name in ("conv_stem", "bn1", "blocks", "conv_head", "bn2"))


def _is_resnet(model: nn.Module) -> bool:
    return all(hasattr(model, name) for name in ("conv1", "bn1", "act1", "maxpool", "layer3", "layer4"))


@dataclass(frozen=True)
class ModelCut:
    """`bottom(images)` -> activations, `top(activations)` -> logits; the top's trained parameters and all its state by name."""

    bottom: nn.Module
    top: nn.Module
    trained_names: tuple[str, ...]
    """State-dict names of the top's parameters, in the model's order (what a refit changes)."""
    top_state_names: frozenset[str]
    """Every state-dict name (parameters and buffers) the top's output depends on beyond its input."""


def cut_model(model: nn.Module, layers: RefitLayers) -> ModelCut:
    """Cut `model` below its classification layer, or below its last feature stage (with its head convolution and BatchNorm).

    'last-stage' knows timm's EfficientNet layout (the last block stage, conv_head, bn2,
    classifier) and ResNets (layer4, fc).
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        raise ModelError(
            f"a refit trains a linear classification layer, and {type(model).__name__} has {type(head).__name__}; "
            "use a timm classifier with a linear head or set federation.head_refit_steps 0"
        )
    if layers == "classification-layer":
        top_modules = [head]
    elif _is_efficientnet(model):
        top_modules = [model.blocks[-1], model.conv_head, model.bn2, head]
    elif _is_resnet(model):
        top_modules = [model.layer4, head]
    else:
        raise ModelError(
            f"the refit of the last stage knows timm's EfficientNet and ResNet layouts, not {type(model).__name__}; "
            "set federation.refit_layers 'classification-layer' (run-config refit-layers)"
        )
    top_ids = {id(tensor) for module in top_modules for tensor in [*module.parameters(), *module.buffers()]}
    state = model.state_dict(keep_vars=True)
    top_state_names = frozenset(name for name, tensor in state.items() if id(tensor) in top_ids)
    trained_names = tuple(name for name, parameter in model.named_parameters() if id(parameter) in top_ids)
    return ModelCut(_Bottom(model, layers), _Top(model, layers), trained_names, top_state_names)
