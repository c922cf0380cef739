"""Which synthetic images may be used: realistic, not near-duplicates, not near-copies of a real image."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from shared.errors import DataError
from shared.gan.features import cosine_distances, nearest_distances

REASONS = ("unrealistic", "memorised", "near_duplicate")


@dataclass
class SelectionThresholds:
    """The distance thresholds of one selection, both from the real images' nearest-neighbour distances."""

    memorisation: float
    duplicate: float
    real_nn_percentiles: dict[str, float]


@dataclass
class SelectionResult:
    """Indices of the kept candidates (best realism first within a class) and rejections per reason and class."""

    kept: np.ndarray
    rejected: dict[str, int]
    rejected_per_class: dict[str, dict[int, int]]
    thresholds: SelectionThresholds
    candidates: int = 0
    kept_per_class: dict[int, int] = field(default_factory=dict)


def real_nearest_neighbour_distances(real_features: np.ndarray) -> np.ndarray:
    """Cosine distance of every real image to its nearest other real image (the memorisation reference)."""
    if len(real_features) < 2:
        raise DataError("the memorisation guard needs at least 2 real training images to measure their spacing")
    return nearest_distances(real_features, real_features, exclude_self=True)


def select_synthetic(
    candidate_labels: np.ndarray,
    candidate_scores: np.ndarray,
    candidate_features: np.ndarray,
    real_features: np.ndarray,
    *,
    realism_reject_fraction: float = 0.25,
    memorisation_percentile: float = 5.0,
    duplicate_percentile: float = 5.0,
) -> SelectionResult:
    """Apply the three filters in order and return what survives.

    1. Realism: within each class, the `realism_reject_fraction` of candidates with the lowest
       discriminator score are rejected (the discriminator ranks; its absolute scale drifts).
    2. Memorisation guard: let r be the cosine distance (classifier features) of every real
       training image to its nearest other real training image; a candidate whose nearest real
       training image is closer than the `memorisation_percentile`-th percentile of r is
       rejected, i.e. it is closer to a patient's image than 95 % (default) of real images are
       to their own nearest neighbour.
    3. Diversity: going through a class's remaining candidates from most to least realistic, a
       candidate closer than the `duplicate_percentile`-th percentile of r to an already kept one
       is rejected as a near-duplicate.
    """
    labels = np.asarray(candidate_labels, dtype=np.int64)
    scores = np.asarray(candidate_scores, dtype=np.float64)
    if not (len(labels) == len(scores) == len(candidate_features)):
        raise ValueError("candidate labels, scores and features must describe the same candidates")
    real_nn = real_nearest_neighbour_distances(real_features)
    thresholds = SelectionThresholds(
        memorisation=float(np.percentile(real_nn, memorisation_percentile)),
        duplicate=float(np.percentile(real_nn, duplicate_percentile)),
        real_nn_percentiles={f"p{p}": float(np.percentile(real_nn, p)) for p in (1, 5, 25, 50)},
    )
    rejected = {reason: 0 for reason in REASONS}
    per_class: dict[str, dict[int, int]] = {reason: {} for reason in REASONS}

    def reject(reason: str, label: int, count: int = 1) -> None:
        rejected[reason] += count
        per_class[reason][label] = per_class[reason].get(label, 0) + count

    nearest_real = nearest_distances(candidate_features, real_features) if len(labels) else np.zeros(0)
    kept: list[int] = []
    kept_per_class: dict[int, int] = {}
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        rows = rows[np.argsort(-scores[rows], kind="stable")]
        realistic_count = len(rows) - int(np.floor(realism_reject_fraction * len(rows)))
        if len(rows) - realistic_count:
            reject("unrealistic", int(label), len(rows) - realistic_count)
        class_kept: list[int] = []
        for row in rows[:realistic_count]:
            if nearest_real[row] < thresholds.memorisation:
                reject("memorised", int(label))
                continue
            if class_kept and cosine_distances(candidate_features[row : row + 1], candidate_features[class_kept]).min() < thresholds.duplicate:
                reject("near_duplicate", int(label))
                continue
            class_kept.append(int(row))
        kept.extend(class_kept)
        kept_per_class[int(label)] = len(class_kept)
    return SelectionResult(np.asarray(kept, dtype=np.int64), rejected, per_class, thresholds, len(labels), kept_per_class)
