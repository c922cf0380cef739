"""Features of a site's images under a classifier's frozen part, computed once and kept for the next rounds."""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.data.cache import CachedImages
from shared.data.loading import make_eval_loader
from shared.data.transforms import build_eval_transform
from shared.models.classifier import model_normalisation
from shared.models.model_cut import ModelCut, cut_model
from shared.precision import Precision
from shared.training import logits_and_labels

CACHED_SITES = 16
"""Feature sets kept in memory and on disk (one per site, split and frozen network): a simulation process holds every site."""
_cache: OrderedDict[str, torch.Tensor] = OrderedDict()


def frozen_part_fingerprint(model: nn.Module, cut: ModelCut | None = None) -> str:
    """A digest of every weight and statistic below the cut (default: outside the classification layer): equal digests, equal features."""
    top = (cut or cut_model(model, "classification-layer")).top_state_names
    digest = hashlib.sha1()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in top:
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _images_fingerprint(images: CachedImages) -> str:
    digest = hashlib.sha1(np.ascontiguousarray(images.images).tobytes())
    digest.update(np.ascontiguousarray(images.labels).tobytes())
    return digest.hexdigest()


def frozen_features(
    model: nn.Module,
    images: CachedImages,
    *,
    device: torch.device,
    precision: Precision,
    batch_size: int = 128,
    cache_dir: Path | None = None,
    cut: ModelCut | None = None,
) -> torch.Tensor:
    """The pooled pre-logit features of every image (eval transform, BatchNorm statistics as learnt), on the CPU;
    with `cut`, the activations its bottom gives (the input of the top a refit trains).

    The frozen part does not change between rounds (nothing trains it and FedAvg of equal weights
    is the same weights), so the features of a site are computed in its first round and reused;
    with `cache_dir` they are also kept on disk, named by the digests of the weights and images (the
    newest CACHED_SITES files), for sites whose every message runs in a fresh process.
    """
    # Not keyed by precision: features of one network under bf16 or fp32 serve the head alike, and a site
    # whose automatic precision choice changes between rounds keeps its features.
    cut = cut or cut_model(model, "classification-layer")
    key = f"{frozen_part_fingerprint(model, cut)}-{_images_fingerprint(images)}"
    stored = Path(cache_dir) / f"{hashlib.sha1(key.encode()).hexdigest()}.pt" if cache_dir is not None else None
    if key in _cache:
        _cache.move_to_end(key)
        features = _cache[key]
    elif stored is not None and stored.exists():
        features = _remember(key, torch.load(stored))
    else:
        features = _remember(key, _compute(model, cut, images, device=device, precision=precision, batch_size=batch_size))
    if stored is not None and not stored.exists():
        stored.parent.mkdir(parents=True, exist_ok=True)
        temporary = stored.with_name(f".{stored.name}.{os.getpid()}.tmp")
        torch.save(features, temporary)
        os.replace(temporary, stored)
        _keep_newest(stored.parent, CACHED_SITES)
    return features


def _keep_newest(folder: Path, count: int) -> None:
    """Delete all but the `count` most recently written feature files of `folder` (each network's features are used for one run)."""
    stored = sorted(folder.glob("*.pt"), key=lambda path: path.stat().st_mtime, reverse=True)
    for path in stored[count:]:
        path.unlink(missing_ok=True)


def _compute(
    model: nn.Module, cut: ModelCut, images: CachedImages, *, device: torch.device, precision: Precision, batch_size: int
) -> torch.Tensor:
    mean, std = model_normalisation(model)
    loader = make_eval_loader(images, batch_size=batch_size, transform=build_eval_transform(mean, std))
    was_training = model.training
    try:
        features, _ = logits_and_labels(cut.bottom, loader, device=device, precision=precision)
    finally:
        model.train(was_training)
    return features.float().cpu()


def _remember(key: str, features: torch.Tensor) -> torch.Tensor:
    _cache[key] = features
    while len(_cache) > CACHED_SITES:
        _cache.popitem(last=False)
    return features
