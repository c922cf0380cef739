"""Aggregation of site metrics: exact pooled counts where possible, example-weighted means otherwise."""

from __future__ import annotations

import math

import numpy as np
from flwr.app import MetricRecord, RecordDict

from shared.metrics import metrics_from_confusion
from shared.protocol import VALIDATION_BALANCED_ACCURACY_KEY, VALIDATION_CONFUSION_KEY

CONFUSION_KEY = "confusion-matrix"
WEIGHT_KEY = "num-examples"
_SECONDS_KEYS = ("train-seconds",)
_MAXIMUM_KEYS = ("epsilon", "epsilon-next-round", "delta")
"""Privacy figures: the round's guarantee is the weakest site's, so they aggregate to the maximum."""
_SUM_KEYS = ("feedback-examples",)
"""Counts over the federation (clinician feedback cases trained on): summed, not averaged."""


def _metric_record(record: RecordDict) -> MetricRecord:
    return next(iter(record.metric_records.values()))


def _weighted_nanmean(values: list[float], weights: list[float]) -> float:
    pairs = [(value, weight) for value, weight in zip(values, weights) if not math.isnan(value)]
    total = sum(weight for _, weight in pairs)
    if not pairs or total == 0:
        return float("nan")
    return sum(value * weight for value, weight in pairs) / total


def _summed_confusion(metrics: list[MetricRecord], key: str) -> tuple[np.ndarray, dict]:
    """The sites' flattened confusion counts under `key`, summed, and the pooled figures they give."""
    flat = np.sum([np.asarray(metric[key], dtype=np.int64) for metric in metrics], axis=0)
    size = int(round(math.sqrt(flat.size)))
    return flat, metrics_from_confusion(flat.reshape(size, size))


def aggregate_site_metrics(records: list[RecordDict], weighted_by_key: str = WEIGHT_KEY) -> MetricRecord:
    """Combine per-site metric records into one.

    A confusion matrix is summed, and accuracy / balanced accuracy are recomputed from the sum:
    the exact pooled figures over all sites' test images. `mean-site-balanced-accuracy` is the
    unweighted mean over sites (FLamby's figure). Validation confusion counts are summed the same
    way into `val-balanced-accuracy` when every site sent them. Time keys take the slowest site, counts such as
    `feedback-examples` are summed. Every other
    scalar or list is an example-weighted mean that ignores NaN (metrics a site cannot define).
    """
    metrics = [_metric_record(record) for record in records]
    weights = [float(metric[weighted_by_key]) for metric in metrics]
    aggregated = MetricRecord({weighted_by_key: int(sum(weights))})
    for key in metrics[0].keys():
        if key == weighted_by_key:
            continue
        if key in (CONFUSION_KEY, VALIDATION_CONFUSION_KEY):
            continue
        values = [metric[key] for metric in metrics]
        if key in _SUM_KEYS:
            aggregated[key] = int(sum(int(value) for value in values))
        elif key in _SECONDS_KEYS or key in _MAXIMUM_KEYS:
            aggregated[key] = float(max(values))
        elif isinstance(values[0], list):
            columns = zip(*values, strict=True)
            aggregated[key] = [_weighted_nanmean([float(v) for v in column], weights) for column in columns]
        else:
            aggregated[key] = _weighted_nanmean([float(value) for value in values], weights)
    if all(VALIDATION_CONFUSION_KEY in metric for metric in metrics):
        flat, pooled = _summed_confusion(metrics, VALIDATION_CONFUSION_KEY)
        aggregated[VALIDATION_CONFUSION_KEY] = [int(value) for value in flat]
        aggregated[VALIDATION_BALANCED_ACCURACY_KEY] = float(pooled["balanced_accuracy"] or 0.0)
    if CONFUSION_KEY in metrics[0]:
        flat, pooled = _summed_confusion(metrics, CONFUSION_KEY)
        aggregated[CONFUSION_KEY] = [int(value) for value in flat]
        aggregated["accuracy"] = float(pooled["accuracy"])
        aggregated["balanced-accuracy"] = float(pooled["balanced_accuracy"])
        if "balanced-accuracy" in metrics[0]:
            aggregated["mean-site-balanced-accuracy"] = float(
                np.nanmean([float(metric["balanced-accuracy"]) for metric in metrics])
            )
    return aggregated
