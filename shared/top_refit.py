"""Refit of the classifier's last stage (last block stage, head convolution and BatchNorm, classification layer) from the sites' summed gradients.

The sites' label skew pulls the averaged model's top layers, not only its classification layer,
towards their local classes. With everything below the last stage frozen, the loss of the top
over all sites' training images and its full-batch gradient are the sums of what each site
computes over its own cached activations at the cut. So the server takes full-batch Adam steps
on the federation's class-balanced loss, with an L2 pull towards the federated weights, each step
one query in which every site sends its summed loss, its gradient (named and shaped like the
top's parameters), its summed image weight and its validation confusion counts: what pooled
training of those layers would do, without an image leaving a site. The refitted top is handed
on unless it is worse on the sites' validation images than the model as trained. Measured on the
four natural HAM10000 sites: see README, "Federated quality".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.data.cache import CachedImages
from shared.errors import ModelError
from shared.head_refit import (
    FederationGradient,
    SiteAnswer,
    SummedAnswers,
    confusion_counts,
    federation_class_weights,
    head_parameter_names,
    refit_head,
    site_head_gradient,
)
from shared.metrics import metrics_from_confusion
from shared.models.frozen_features import frozen_features
from shared.models.model_cut import RefitLayers, cut_model
from shared.precision import Precision

TOP_REFIT_LEARNING_RATE = 3e-4
"""Adam step size of the server's full-batch steps (measured, see README)."""
TOP_REFIT_PULL = 1e-3
"""L2 weight of the distance to the federated weights in the refit's loss."""
ACTIVATION_CHUNK = 1024
"""Images per forward and backward pass through the top at a site."""


def site_top_gradient(
    model: nn.Module,
    train_images: CachedImages,
    val_images: CachedImages,
    federation_class_counts: list[int] | None,
    *,
    device: torch.device,
    precision: Precision,
    cache_dir: Path | None = None,
) -> SiteAnswer:
    """A site's answer to one refit query of the last stage: summed class-weighted loss, gradient by parameter name,
    summed image weight (over its training images) and its validation confusion counts.

    The activations below the cut are computed once per frozen network (shared.models.frozen_features);
    the top runs in eval mode (BatchNorm statistics as learnt) and in fp32.
    """
    cut = cut_model(model, "last-stage")
    num_classes = len(train_images.classes)
    weights = torch.as_tensor(federation_class_weights(train_images, federation_class_counts), dtype=torch.float32)
    activations = frozen_features(model, train_images, device=device, precision=precision, cache_dir=cache_dir, cut=cut)
    labels = torch.as_tensor(np.asarray(train_images.labels), dtype=torch.int64)
    parameters = dict(model.named_parameters())
    trained = [parameters[name] for name in cut.trained_names]
    was_training = model.training
    model.eval()
    try:
        for parameter in trained:
            parameter.grad = None
        loss = 0.0
        for start in range(0, len(labels), ACTIVATION_CHUNK):
            chunk_labels = labels[start : start + ACTIVATION_CHUNK].to(device)
            logits = cut.top(activations[start : start + ACTIVATION_CHUNK].to(device)).float()
            summed = (F.cross_entropy(logits, chunk_labels, reduction="none") * weights.to(device)[chunk_labels]).sum()
            summed.backward()
            loss += float(summed.detach())
        gradient = {
            name: (parameter.grad.detach().float().cpu().numpy() if parameter.grad is not None else np.zeros(tuple(parameter.shape), np.float32))
            for name, parameter in zip(cut.trained_names, trained)
        }
        confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        if len(val_images):
            val_activations = frozen_features(model, val_images, device=device, precision=precision, cache_dir=cache_dir, cut=cut)
            with torch.no_grad():
                val_logits = torch.cat([
                    cut.top(val_activations[start : start + ACTIVATION_CHUNK].to(device)).float().cpu()
                    for start in range(0, len(val_activations), ACTIVATION_CHUNK)
                ])
            confusion = confusion_counts(val_logits, torch.as_tensor(np.asarray(val_images.labels)), num_classes)
    finally:
        for parameter in trained:
            parameter.grad = None
        model.train(was_training)
    image_weight = float(weights[labels].sum())
    return SiteAnswer(loss, gradient, image_weight, [int(count) for count in confusion.ravel()])


@dataclass
class TopRefitResult:
    """The top a refit hands on (by parameter name), whether it is the refitted one, and each query's validation balanced accuracy."""

    layers: dict[str, np.ndarray]
    refitted: bool
    validation_balanced_accuracy: list[float | None] = field(default_factory=list)
    """One entry per query of the sites: the unchanged top first, the handed-on candidate last."""


def refit_top(
    layers: dict[str, np.ndarray],
    gradient_at: Callable[[dict[str, np.ndarray]], SummedAnswers],
    *,
    steps: int,
    learning_rate: float = TOP_REFIT_LEARNING_RATE,
    pull: float = TOP_REFIT_PULL,
) -> TopRefitResult:
    """`steps` full-batch Adam steps on the federation's class-balanced loss of the top, in `steps` + 1 calls of `gradient_at`.

    `gradient_at(layers)` asks the sites for their sums at the given top (float32, as the model
    holds it). The refitted top is handed on unless its validation balanced accuracy is below the
    unchanged top's (sites without validation images: the refitted one).
    """
    start = {name: torch.tensor(np.asarray(value), dtype=torch.float64) for name, value in layers.items()}
    current = {name: value.clone().requires_grad_(True) for name, value in start.items()}
    optimiser = torch.optim.Adam(current.values(), lr=learning_rate)
    scores: list[float | None] = []

    def ask() -> SummedAnswers:
        summed = gradient_at({name: value.detach().float().numpy() for name, value in current.items()})
        scores.append(metrics_from_confusion(summed.validation_confusion)["balanced_accuracy"])
        if summed.summed_image_weight <= 0:
            raise ModelError("the refit got no weighted training images; no site has images of the run's classes")
        return summed

    for _ in range(steps):
        summed = ask()
        with torch.no_grad():
            for name, value in current.items():
                value.grad = torch.as_tensor(summed.gradient[name], dtype=torch.float64) / summed.summed_image_weight
                value.grad += 2 * pull * (value - start[name])
        optimiser.step()
    ask()
    before, after = scores[0], scores[-1]
    if before is not None and after is not None and after < before:
        return TopRefitResult({name: np.asarray(value) for name, value in layers.items()}, False, scores)
    return TopRefitResult({name: value.detach().float().numpy() for name, value in current.items()}, True, scores)


def site_refit_gradient(layers: RefitLayers) -> Callable[..., SiteAnswer]:
    """The site's answer to a refit query of `layers`: `site_top_gradient` or `shared.head_refit.site_head_gradient`."""
    return site_top_gradient if layers == "last-stage" else site_head_gradient


def refit_layers(
    layers: RefitLayers, model: nn.Module, base: dict[str, np.ndarray], sums_at: Callable[[dict[str, np.ndarray]], SummedAnswers], *, steps: int
) -> TopRefitResult:
    """The run's refit from the model's arrays `base`: the classification layer by L-BFGS (shared.head_refit) or the last
    stage by Adam (`refit_top`); `sums_at(values)` asks the sites at `base` with the given parameters replaced."""
    if layers == "last-stage":
        return refit_top({name: base[name] for name in cut_model(model, layers).trained_names}, sums_at, steps=steps)
    weight_name, bias_name = head_parameter_names(model)

    def gradient_at(weight: np.ndarray, bias: np.ndarray) -> FederationGradient:
        summed = sums_at({weight_name: weight, bias_name: bias})
        return FederationGradient(
            summed.loss, summed.gradient[weight_name], summed.gradient[bias_name], summed.summed_image_weight, summed.validation_confusion
        )

    head = refit_head(base[weight_name], base[bias_name], gradient_at, steps=steps)
    return TopRefitResult({weight_name: head.weight, bias_name: head.bias}, head.refitted, head.validation_balanced_accuracy)
