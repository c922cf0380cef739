"""Image features from a classifier trained on real lesions: the space for distances, FD and selection."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from shared.models.classifier import model_normalisation

_BATCH = 64


@torch.no_grad()
def classifier_features(model: nn.Module, images: np.ndarray, *, image_size: int, batch_size: int = _BATCH) -> np.ndarray:
    """Penultimate-layer features float32 [N, D] of uint8 [N, H, W, 3] images, resized to `image_size`.

    The features are timm's pre-logits (after global pooling), normalised the way the model's
    weights expect, computed in fp32 with the model in eval mode.
    """
    model.eval()
    device = next(model.parameters()).device
    mean, std = model_normalisation(model)
    mean_t = torch.tensor(mean, device=device)[None, :, None, None]
    std_t = torch.tensor(std, device=device)[None, :, None, None]
    outputs = []
    for start in range(0, len(images), batch_size):
        chunk = torch.from_numpy(np.array(images[start : start + batch_size])).permute(0, 3, 1, 2).float() / 255.0
        if chunk.shape[-1] != image_size:
            chunk = nn.functional.interpolate(chunk, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        chunk = (chunk.to(device) - mean_t) / std_t
        pooled = model.forward_head(model.forward_features(chunk), pre_logits=True)
        outputs.append(pooled.float().flatten(1).cpu())
    if not outputs:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(outputs).numpy().astype(np.float32)


def unit_rows(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine geometry); all-zero rows stay zero."""
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def cosine_distances(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    """1 - cosine similarity between every query row and every reference row [Q, R]."""
    return np.clip(1.0 - unit_rows(queries) @ unit_rows(references).T, 0.0, 2.0)


def nearest_distances(queries: np.ndarray, references: np.ndarray, *, exclude_self: bool = False, chunk: int = 1024) -> np.ndarray:
    """Cosine distance from every query to its nearest reference; `exclude_self` when both are the same set."""
    nearest = np.empty(len(queries), dtype=np.float64)
    for start in range(0, len(queries), chunk):
        distances = cosine_distances(queries[start : start + chunk], references)
        if exclude_self:
            rows = np.arange(distances.shape[0])
            distances[rows, rows + start] = np.inf
        nearest[start : start + chunk] = distances.min(axis=1) if distances.shape[1] else np.inf
    return nearest
