"""Refit of the classification layer over the frozen network's features: class-balanced, from the sums the sites send.

Sites of different class mixes leave an averaged model whose feature extractor is nearly as good
as a pooled model's but whose classification layer is not: each round pulled it towards the local
classes. With the rest of the network frozen, the layer's loss is convex in its weights, and its
loss and full-batch gradient over all sites are the sums of what each site computes on its own
training images. So the server minimises the class-balanced loss of the whole federation (each
image weighted by the inverse of its class's federation count, plus weight decay) with L-BFGS,
every evaluation one query in which each site sends its summed loss and gradient (the layer's
shape) and its validation confusion counts. The refitted layer is handed on unless it is worse
on the sites' validation images than the layer as trained. Measured on the four natural
HAM10000 sites: see README, "Federated quality".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.data.cache import CachedImages
from shared.errors import ModelError
from shared.metrics import metrics_from_confusion
from shared.models.frozen_features import frozen_features
from shared.models.model_cut import cut_model
from shared.precision import Precision

HEAD_REFIT_STEPS = 30
"""Loss and gradient evaluations of the refit's L-BFGS (each one query of the sites; measured, see README)."""
HEAD_REFIT_WEIGHT_DECAY = 3e-3
"""L2 weight of the layer's weights in the refit's loss (the training images' features are cleaner than unseen ones')."""


def head_parameter_names(model: nn.Module) -> tuple[str, str]:
    """The state-dict names of the classification layer's weight and bias."""
    names = cut_model(model, "classification-layer").trained_names
    if len(names) != 2:
        raise ModelError(
            f"the head refit trains a linear classification layer with a bias, and {type(model).__name__}'s has no bias; "
            "use a timm classifier with a linear head or set federation.head_refit_steps 0"
        )
    return names[0], names[1]


def balanced_class_weights(class_counts: list[int] | np.ndarray) -> np.ndarray:
    """Per-image loss weight of each class: total / (classes present x class count), 0 for a class without images."""
    counts = np.asarray(class_counts, dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def summed_head_gradient(
    weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, class_weights: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray, float]:
    """L = sum_i w(y_i) * cross-entropy(W x_i + b, y_i) over the given images, its gradient (W, b), and sum_i w(y_i).

    Closed form of the softmax cross-entropy: (softmax - one-hot) per image, times [x_i, 1].
    """
    weight, bias = weight.detach().double().cpu(), bias.detach().double().cpu()
    features, labels = features.double().cpu(), labels.long().cpu()
    if features.shape[1] != weight.shape[1]:
        raise ModelError(f"features of length {features.shape[1]} do not fit a classification layer of input {weight.shape[1]}")
    per_image = torch.as_tensor(class_weights, dtype=torch.float64)[labels]
    log_probabilities = torch.log_softmax(features @ weight.T + bias, dim=1)
    loss = -float((log_probabilities[torch.arange(len(labels)), labels] * per_image).sum())
    residual = log_probabilities.exp()
    residual[torch.arange(len(labels)), labels] -= 1
    residual *= per_image[:, None]
    return loss, (residual.T @ features).numpy(), residual.sum(0).numpy(), float(per_image.sum())


def federation_class_weights(train_images: CachedImages, federation_class_counts: list[int] | None) -> np.ndarray:
    """Per-image loss weight of each class by the federation's counts (a class the census missed, by the site's own)."""
    own = train_images.class_counts()
    federation = federation_class_counts or [0] * len(train_images.classes)
    return balanced_class_weights([max(int(total), int(count)) for total, count in zip(federation, own)])


def confusion_counts(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class) pairs: rows are true classes."""
    predicted = logits.argmax(dim=1).long().cpu()
    flat = labels.long().cpu() * num_classes + predicted
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes).numpy()


@dataclass(frozen=True)
class SiteAnswer:
    """One site's sums at one layer, as it sends them."""

    loss: float
    gradient: dict[str, np.ndarray]
    image_weight: float
    validation_confusion: list[int]


def site_head_gradient(
    model: nn.Module,
    train_images: CachedImages,
    val_images: CachedImages,
    federation_class_counts: list[int] | None,
    *,
    device: torch.device,
    precision: Precision,
    cache_dir: Path | None = None,
) -> SiteAnswer:
    """A site's answer to one refit query: its summed loss, gradient (by layer name) and image weight, and its validation confusion.

    Classes are weighted by the federation's counts (a class the census missed, by the site's own).
    The features of the frozen part are computed once per network (see shared.models.frozen_features).
    """
    num_classes = len(train_images.classes)
    weights = federation_class_weights(train_images, federation_class_counts)
    weight_name, bias_name = head_parameter_names(model)
    head = model.get_classifier()
    features = frozen_features(model, train_images, device=device, precision=precision, cache_dir=cache_dir)
    labels = torch.as_tensor(np.asarray(train_images.labels), dtype=torch.int64)
    loss, weight_gradient, bias_gradient, image_weight = summed_head_gradient(head.weight, head.bias, features, labels, weights)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    if len(val_images):
        val_features = frozen_features(model, val_images, device=device, precision=precision, cache_dir=cache_dir)
        logits = val_features.double() @ head.weight.detach().double().cpu().T + head.bias.detach().double().cpu()
        confusion = confusion_counts(logits, torch.as_tensor(np.asarray(val_images.labels)), num_classes)
    gradient = {weight_name: weight_gradient.astype(np.float32), bias_name: bias_gradient.astype(np.float32)}
    return SiteAnswer(loss, gradient, image_weight, [int(count) for count in confusion.ravel()])


@dataclass(frozen=True)
class FederationGradient:
    """What the sites' answers at one set of layer weights sum to."""

    loss: float
    """Summed weighted cross-entropy of the training images."""
    weight_gradient: np.ndarray
    bias_gradient: np.ndarray
    summed_image_weight: float
    validation_confusion: np.ndarray


@dataclass(frozen=True)
class SummedAnswers:
    """What the sites' answers at one set of layer weights sum to, gradient by parameter name."""

    loss: float
    gradient: dict[str, np.ndarray]
    summed_image_weight: float
    validation_confusion: np.ndarray


def sum_answers(answers: Sequence[SiteAnswer], names: Sequence[str], num_classes: int) -> SummedAnswers:
    """The sum of the sites' answers (zeros without answers)."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    gradient: dict[str, np.ndarray | float] = {name: 0.0 for name in names}
    for answer in answers:
        confusion += np.reshape(np.asarray(answer.validation_confusion, dtype=np.int64), (num_classes, num_classes))
        for name in names:
            gradient[name] = gradient[name] + answer.gradient[name].astype(np.float64)
    return SummedAnswers(
        sum(answer.loss for answer in answers),
        {name: np.asarray(value) for name, value in gradient.items()},
        sum(answer.image_weight for answer in answers),
        confusion,
    )


@dataclass
class RefitResult:
    """The layer a refit hands on, whether it is the refitted one, and the validation balanced accuracy of every evaluated layer."""

    weight: np.ndarray
    bias: np.ndarray
    refitted: bool
    validation_balanced_accuracy: list[float | None] = field(default_factory=list)
    """One entry per query of the sites: the unchanged layer first, the handed-on candidate last."""


def refit_head(
    weight: np.ndarray,
    bias: np.ndarray,
    gradient_at: Callable[[np.ndarray, np.ndarray], FederationGradient],
    *,
    steps: int = HEAD_REFIT_STEPS,
    weight_decay: float = HEAD_REFIT_WEIGHT_DECAY,
) -> RefitResult:
    """Minimise the federation's class-balanced loss of the layer with L-BFGS in about `steps` + 1 calls of `gradient_at`.

    `gradient_at(weight, bias)` asks the sites for their sums at a layer (float32, as the model
    holds it). The refitted layer is handed on unless its validation balanced accuracy is below
    the unchanged layer's (sites without validation images: the refitted one).
    """
    layer = [torch.tensor(np.asarray(weight), dtype=torch.float64, requires_grad=True),
             torch.tensor(np.asarray(bias), dtype=torch.float64, requires_grad=True)]
    scores: list[float | None] = []

    def evaluate() -> torch.Tensor:
        summed = gradient_at(*(value.detach().float().numpy() for value in layer))
        scores.append(metrics_from_confusion(summed.validation_confusion)["balanced_accuracy"])
        if summed.summed_image_weight <= 0:
            raise ModelError("the head refit got no weighted training images; no site has images of the run's classes")
        total = summed.summed_image_weight
        with torch.no_grad():
            layer[0].grad = torch.as_tensor(summed.weight_gradient, dtype=torch.float64) / total + 2 * weight_decay * layer[0]
            layer[1].grad = torch.as_tensor(summed.bias_gradient, dtype=torch.float64) / total
            return torch.tensor(summed.loss / total + weight_decay * float((layer[0] ** 2).sum()))

    optimiser = torch.optim.LBFGS(layer, lr=1, max_iter=steps, max_eval=steps, history_size=10, line_search_fn="strong_wolfe")
    optimiser.step(evaluate)
    evaluate()
    before, after = scores[0], scores[-1]
    keep = before is None or after is None or after >= before
    if not keep:
        return RefitResult(np.asarray(weight), np.asarray(bias), False, scores)
    return RefitResult(layer[0].detach().float().numpy(), layer[1].detach().float().numpy(), True, scores)
