"""Server-side aggregation of site replies, checked on constructed replies (Prepare / Execute / Assert)."""

import math

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict

from server.aggregation import aggregate_site_metrics


def _reply(num_examples, confusion, balanced_accuracy, macro_auc, seconds=None):
    metrics = {
        "num-examples": num_examples,
        "loss": 1.0 if num_examples > 10 else 3.0,
        "balanced-accuracy": balanced_accuracy,
        "macro-auc": macro_auc,
        "per-class-auc": [0.5, macro_auc],
        "confusion-matrix": [int(v) for v in np.asarray(confusion).ravel()],
    }
    if seconds is not None:
        metrics["train-seconds"] = seconds
    return RecordDict({"metrics": MetricRecord(metrics)})


def test_confusion_matrices_are_summed_and_pooled_scores_recomputed():
    site_a = _reply(30, [[10, 0], [5, 15]], balanced_accuracy=0.875, macro_auc=0.9)
    site_b = _reply(10, [[0, 0], [2, 8]], balanced_accuracy=0.8, macro_auc=float("nan"))

    aggregated = aggregate_site_metrics([site_a, site_b], "num-examples")

    assert aggregated["num-examples"] == 40
    assert aggregated["confusion-matrix"] == [10, 0, 7, 23]
    assert aggregated["accuracy"] == pytest.approx(33 / 40)
    assert aggregated["balanced-accuracy"] == pytest.approx((10 / 10 + 23 / 30) / 2)
    assert aggregated["mean-site-balanced-accuracy"] == pytest.approx((0.875 + 0.8) / 2)
    # NaN (undefined at a site) is ignored, not propagated
    assert aggregated["macro-auc"] == pytest.approx(0.9)
    assert aggregated["per-class-auc"] == pytest.approx([0.5, 0.9])
    assert aggregated["loss"] == pytest.approx((30 * 1.0 + 10 * 3.0) / 40)


def test_time_is_the_slowest_site_not_an_average():
    replies = [_reply(30, [[1, 0], [0, 1]], 1.0, 1.0, seconds=12.0), _reply(10, [[1, 0], [0, 1]], 1.0, 1.0, seconds=3.0)]
    assert aggregate_site_metrics(replies)["train-seconds"] == 12.0


def test_all_nan_stays_nan():
    replies = [_reply(5, [[1, 0], [0, 1]], 1.0, float("nan")), _reply(5, [[1, 0], [0, 1]], 1.0, float("nan"))]
    assert math.isnan(aggregate_site_metrics(replies)["macro-auc"])


def test_feedback_cases_are_counted_over_the_federation_not_averaged():
    replies = [
        RecordDict({"metrics": MetricRecord({"num-examples": 30, "train-loss": 1.0, "feedback-examples": 4})}),
        RecordDict({"metrics": MetricRecord({"num-examples": 10, "train-loss": 2.0, "feedback-examples": 1})}),
    ]
    assert aggregate_site_metrics(replies)["feedback-examples"] == 5
