"""Temperature scaling (Guo et al. 2017) fitted federatedly, and the calibration error a site report shows.

Every site scores the selected global model's logits on its validation split at a fixed grid of
temperatures and sends only the summed negative log-likelihoods; the server adds them up and
takes the temperature with the lowest total, which is the pooled maximum-likelihood choice on
that grid. The temperature is folded into the classification layer (weights and bias divided
by it), so every consumer of the saved model, from the web app to ONNX, gives calibrated
probabilities with the same top class.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import ModelError

TEMPERATURES = np.round(np.geomspace(0.25, 8.0, 61), 4)
"""The temperature grid every site scores (log-spaced, holds 1.0)."""
CALIBRATION_BINS = 15


def summed_negative_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor, temperatures=TEMPERATURES) -> np.ndarray:
    """Sum over images of -log softmax(logits / T)[label], for every temperature T of the grid."""
    logits, labels = logits.float(), labels.long()
    return np.asarray(
        [float(F.cross_entropy(logits / float(temperature), labels, reduction="sum")) for temperature in temperatures]
    )


def best_temperature(summed: np.ndarray, temperatures=TEMPERATURES) -> float:
    """The grid temperature with the lowest total negative log-likelihood."""
    summed = np.asarray(summed, dtype=np.float64)
    if summed.shape != (len(temperatures),) or not np.all(np.isfinite(summed)):
        raise ModelError(
            f"calibration needs one finite likelihood per grid temperature ({len(temperatures)}), got shape {summed.shape}; "
            "sites and server must run the same skin-fl version"
        )
    return float(temperatures[int(np.argmin(summed))])


def fold_temperature(model: nn.Module, temperature: float) -> None:
    """Divide the classification layer's weights and bias by `temperature`: logits become logits / T."""
    if temperature <= 0:
        raise ModelError(f"temperature {temperature} must be positive")
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        raise ModelError(
            f"temperature scaling folds into a linear classification layer, and {type(model).__name__} has "
            f"{type(head).__name__}; use a timm classifier with a linear head or turn calibration off"
        )
    with torch.no_grad():
        head.weight.div_(temperature)
        if head.bias is not None:
            head.bias.div_(temperature)


def calibration_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """Reliability of the top-class probability: per equal-width bin, count, mean confidence and accuracy, and the ECE."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    confidence_sums = np.bincount(which, weights=confidence, minlength=bins)
    correct_sums = np.bincount(which, weights=correct, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.where(counts > 0, confidence_sums / counts, np.nan)
        accuracy = np.where(counts > 0, correct_sums / counts, np.nan)
    error = float(np.abs(confidence_sums - correct_sums).sum() / max(len(labels), 1))
    return {
        "expected_calibration_error": error,
        "bin_edges": edges.tolist(),
        "counts": counts.astype(int).tolist(),
        "mean_confidence": [None if np.isnan(value) else float(value) for value in mean_confidence],
        "accuracy": [None if np.isnan(value) else float(value) for value in accuracy],
    }
