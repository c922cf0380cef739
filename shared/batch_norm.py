"""BatchNorm statistics of a global model measured at the sites and merged into the pooled statistics.

Averaging the sites' running means and variances after local training gives statistics of
four different local models, not of the averaged one; under feature shift between hospitals
(other dermatoscopes, other lighting) the global model then normalises with the wrong numbers.
Here every site passes its training images once through the *global* model and returns, per
BatchNorm layer, the mean and variance of that layer's input over its images; the server merges
them exactly into the pooled mean and variance (the law of total variance), as pooled training
would estimate them. No image leaves a site, and BatchNorm statistics travel in every FedAvg
round already.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from shared.data.cache import CachedImages
from shared.data.loading import make_train_loader
from shared.data.transforms import build_eval_transform
from shared.errors import ModelError
from shared.models.classifier import model_normalisation
from shared.precision import Precision
from shared.training import place_model


def _batch_norm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)}


def measure_batch_norm_statistics(
    model: nn.Module, images: CachedImages, *, batch_size: int, device: torch.device, precision: Precision
) -> dict[str, np.ndarray]:
    """Mean and variance of every BatchNorm layer's input over `images`, under the model's current weights.

    Keys are the state-dict names of the running statistics (`<layer>.running_mean`,
    `<layer>.running_var`). The model's own weights and statistics are left as they were.
    """
    layers = _batch_norm_layers(model)
    if not layers:
        return {}
    saved = {name: (layer.momentum, layer.running_mean.clone(), layer.running_var.clone()) for name, layer in layers.items()}
    was_training = model.training
    mean, std = model_normalisation(model)
    # Shuffled, so that every batch's variance estimates the site's variance (a cache may be sorted by class).
    loader = make_train_loader(images, batch_size=batch_size, transform=build_eval_transform(mean, std), balance="none", seed=0)
    place_model(model, torch.device(device))
    try:
        for layer in layers.values():
            # momentum None: the running statistics become the plain average over every batch seen.
            layer.momentum = None
            layer.reset_running_stats()
        model.train()
        with torch.no_grad():
            for batch, _ in loader:
                if batch.shape[0] < 2:
                    continue
                with precision.autocast():
                    model(batch.to(device, non_blocking=True))
        statistics = {}
        for name, layer in layers.items():
            statistics[f"{name}.running_mean"] = layer.running_mean.detach().float().cpu().numpy().copy()
            statistics[f"{name}.running_var"] = layer.running_var.detach().float().cpu().numpy().copy()
        return statistics
    finally:
        for name, layer in layers.items():
            momentum, running_mean, running_var = saved[name]
            layer.momentum = momentum
            layer.running_mean.copy_(running_mean)
            layer.running_var.copy_(running_var)
        model.train(was_training)


def merge_batch_norm_statistics(
    per_site: Sequence[Mapping[str, np.ndarray]], counts: Sequence[int]
) -> dict[str, np.ndarray]:
    """The pooled mean and variance of every layer from the sites' own, weighted by their numbers of images."""
    if not per_site or len(per_site) != len(counts) or sum(counts) <= 0:
        raise ModelError("merging BatchNorm statistics needs at least one site with images and one count per site")
    total = float(sum(counts))
    merged = {}
    for name in per_site[0]:
        if not name.endswith("running_mean"):
            continue
        layer = name[: -len("running_mean")]
        means = [np.asarray(site[name], dtype=np.float64) for site in per_site]
        variances = [np.asarray(site[f"{layer}running_var"], dtype=np.float64) for site in per_site]
        pooled_mean = sum(count / total * mean for count, mean in zip(counts, means))
        second_moment = sum(count / total * (variance + mean**2) for count, mean, variance in zip(counts, means, variances))
        merged[name] = pooled_mean.astype(np.float32)
        merged[f"{layer}running_var"] = np.maximum(second_moment - pooled_mean**2, 0.0).astype(np.float32)
    return merged
