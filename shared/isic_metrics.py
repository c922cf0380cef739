"""ISIC 2018/2019 challenge scoring: per-category and aggregate metrics with the challenge scorer's definitions.

Follows `isic-challenge-scoring` (ImageMarkup), the scorer of the ISIC 2018 task 3 and ISIC 2019
classification challenges, with unit weights:

- per category, an image is a positive prediction when that category's probability exceeds 0.5
  (not the arg-max); sensitivity, specificity, PPV and NPV are 1.0 when their denominator is
  zero (the scorer's "freebie"); AUC and average precision are scikit-learn's;
- AUC above 80 % sensitivity is the raw (not McClish-normalised) area under the ROC curve over
  the part where the true-positive rate is at least 0.8: the curve with every threshold
  (`drop_intermediate=False`), cut at a point interpolated at TPR 0.8; 1.0 for a perfect
  ranking, 0.18 for chance;
- the aggregate balanced accuracy is the mean recall of the arg-max labels over the categories,
  where an image whose highest probability is shared by two categories counts as undecided
  (wrong for every category).

Where the scorer would fail (a category with no positive or no negative image has no ROC curve),
AUC, AUC above 80 % sensitivity and average precision are None.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import auc as trapezoid_area
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from shared.errors import DataError

SENSITIVITY_THRESHOLD = 0.8
UNDECIDED = -1
PER_CATEGORY_KEYS = ("accuracy", "sensitivity", "specificity", "dice", "ppv", "npv", "auc", "auc_sens_80", "ap")


def _rate(numerator: float, denominator: float) -> float:
    """A ratio that is 1.0 when undefined, as the challenge scorer scores it."""
    return float(numerator / denominator) if denominator else 1.0


def auc_above_sensitivity(is_positive: np.ndarray, scores: np.ndarray, sensitivity: float = SENSITIVITY_THRESHOLD) -> float:
    """Raw partial area under the ROC curve where the true-positive rate is at least `sensitivity`."""
    if not 0 < sensitivity <= 1:
        raise ValueError(f"sensitivity threshold {sensitivity} must lie in (0, 1]")
    false_positive_rates, true_positive_rates, _ = roc_curve(is_positive, scores, drop_intermediate=False)
    # First curve point at or above the threshold (left side of any run of equal rates).
    index = int(np.searchsorted(true_positive_rates, sensitivity, side="left"))
    # An extra point exactly at the threshold, interpolated on the segment that straddles it.
    threshold_false_positive_rate = np.interp(
        sensitivity, true_positive_rates[index - 1 : index + 1], false_positive_rates[index - 1 : index + 1]
    )
    segment_true = np.insert(true_positive_rates[index:], 0, sensitivity)
    segment_false = np.insert(false_positive_rates[index:], 0, threshold_false_positive_rate)
    return float(trapezoid_area(segment_false, segment_true))


def argmax_labels(probabilities: np.ndarray) -> np.ndarray:
    """The arg-max category of every row, or UNDECIDED (-1) where the highest probability is shared."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = probabilities.argmax(axis=1)
    shared_maximum = (probabilities == probabilities.max(axis=1, keepdims=True)).sum(axis=1) > 1
    labels[shared_maximum] = UNDECIDED
    return labels


def category_metrics(is_positive: np.ndarray, scores: np.ndarray) -> dict:
    """The challenge's per-category metrics of one category's probabilities against its truth."""
    is_positive = np.asarray(is_positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    called = scores > 0.5
    true_positive = int((called & is_positive).sum())
    true_negative = int((~called & ~is_positive).sum())
    false_positive = int((called & ~is_positive).sum())
    false_negative = int((~called & is_positive).sum())
    ranked = 0 < is_positive.sum() < is_positive.size
    return {
        "accuracy": _rate(true_positive + true_negative, is_positive.size),
        "sensitivity": _rate(true_positive, true_positive + false_negative),
        "specificity": _rate(true_negative, true_negative + false_positive),
        "dice": _rate(2 * true_positive, 2 * true_positive + false_positive + false_negative),
        "ppv": _rate(true_positive, true_positive + false_positive),
        "npv": _rate(true_negative, true_negative + false_negative),
        "auc": float(roc_auc_score(is_positive, scores)) if ranked else None,
        "auc_sens_80": auc_above_sensitivity(is_positive, scores) if ranked else None,
        "ap": float(average_precision_score(is_positive, scores)) if ranked else None,
        "support": int(is_positive.sum()),
    }


def isic_scores(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict:
    """Per-category metrics, their macro averages and the aggregate balanced accuracy, JSON-ready."""
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(classes):
        raise DataError(f"probabilities of shape {probabilities.shape} do not match the {len(classes)} classes {classes}")
    if labels.shape != (probabilities.shape[0],) or labels.size == 0:
        raise DataError(f"{labels.shape} labels for {probabilities.shape[0]} predictions; give one label per image, at least one")
    if labels.min() < 0 or labels.max() >= len(classes):
        raise DataError(f"labels must lie in 0..{len(classes) - 1} (classes {classes}); got {labels.min()}..{labels.max()}")
    per_category = {name: category_metrics(labels == index, probabilities[:, index]) for index, name in enumerate(classes)}
    macro_average = {}
    for key in PER_CATEGORY_KEYS:
        values = [scores[key] for scores in per_category.values() if scores[key] is not None]
        macro_average[key] = float(np.mean(values)) if values else None
    predicted = argmax_labels(probabilities)
    present = [index for index in range(len(classes)) if (labels == index).any()]
    balanced_accuracy = float(np.mean([(predicted[labels == index] == index).mean() for index in present]))
    return {
        "per_category": per_category,
        "macro_average": macro_average,
        "aggregate": {"balanced_accuracy": balanced_accuracy, "undecided": int((predicted == UNDECIDED).sum())},
    }
