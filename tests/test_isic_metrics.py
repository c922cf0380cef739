"""Hand-computed cases of the ISIC challenge metrics (isic-challenge-scoring definitions)."""

import numpy as np
import pytest

from shared.errors import DataError
from shared.isic_metrics import argmax_labels, auc_above_sensitivity, category_metrics, isic_scores


def test_partial_auc_of_a_vertical_crossing():
    # ROC points (0,0) (0,.5) (.5,.5) (.5,1) (1,1): TPR reaches 0.8 at FPR 0.5; area right of it is 0.5 x 1.
    assert auc_above_sensitivity(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.6, 0.1])) == pytest.approx(0.5)


def test_partial_auc_interpolates_on_a_tied_segment():
    # A tie at 0.5 gives the diagonal (0,.5)-(.5,1): TPR 0.8 sits at FPR 0.3.
    # Area = trapezoid (0.3..0.5, TPR 0.8..1) 0.2 x 0.9 + rectangle (0.5..1) 0.5 x 1 = 0.68.
    assert auc_above_sensitivity(np.array([1, 1, 0, 0]), np.array([0.9, 0.5, 0.5, 0.1])) == pytest.approx(0.68)


def test_partial_auc_bounds_perfect_and_chance():
    truth = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    assert auc_above_sensitivity(truth, np.linspace(1, 0, 10)) == pytest.approx(1.0)
    # One score for all: the ROC curve is the diagonal, area above TPR 0.8 = (0.8 + 1) / 2 x 0.2.
    assert auc_above_sensitivity(truth, np.full(10, 0.5)) == pytest.approx(0.18)
    with pytest.raises(ValueError, match="sensitivity threshold"):
        auc_above_sensitivity(truth, np.full(10, 0.5), sensitivity=0)


def test_category_metrics_by_hand():
    truth = np.array([1, 1, 0, 0])
    scores = np.array([0.9, 0.5, 0.5, 0.1])  # 0.5 is not above 0.5: called negative
    metrics = category_metrics(truth, scores)
    # TP 1, FN 1, TN 2, FP 0
    assert metrics["sensitivity"] == pytest.approx(0.5)
    assert metrics["specificity"] == pytest.approx(1.0)
    assert metrics["ppv"] == pytest.approx(1.0)
    assert metrics["npv"] == pytest.approx(2 / 3)
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["dice"] == pytest.approx(2 / 3)
    assert metrics["auc"] == pytest.approx(3.5 / 4)  # pairs: 1, 1, tie 0.5, 1
    assert metrics["ap"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert metrics["auc_sens_80"] == pytest.approx(0.68)


def test_undefined_rates_are_freebies_and_rankings_without_negatives_are_none():
    metrics = category_metrics(np.array([0, 0, 0]), np.array([0.1, 0.2, 0.3]))
    assert metrics["sensitivity"] == 1.0 and metrics["ppv"] == 1.0 and metrics["specificity"] == 1.0
    assert metrics["auc"] is None and metrics["auc_sens_80"] is None and metrics["ap"] is None


def test_aggregate_balanced_accuracy_counts_ties_as_undecided():
    probabilities = np.array(
        [
            [0.7, 0.2, 0.1],  # class 0, right
            [0.4, 0.4, 0.2],  # class 0, tie: undecided, wrong
            [0.1, 0.8, 0.1],  # class 1, right
            [0.2, 0.3, 0.5],  # class 2, right
            [0.6, 0.3, 0.1],  # class 2, wrong
        ]
    )
    labels = np.array([0, 0, 1, 2, 2])
    assert argmax_labels(probabilities).tolist() == [0, -1, 1, 2, 0]
    scores = isic_scores(labels, probabilities, ["a", "b", "c"])
    assert scores["aggregate"]["balanced_accuracy"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert scores["aggregate"]["undecided"] == 1
    # Category a: called (p > 0.5) on rows 0 and 4 -> TP 1, FP 1, FN 1, TN 2.
    a = scores["per_category"]["a"]
    assert (a["sensitivity"], a["specificity"], a["ppv"], a["npv"]) == pytest.approx((0.5, 2 / 3, 0.5, 2 / 3))
    assert scores["macro_average"]["sensitivity"] == pytest.approx(np.mean([0.5, 1.0, 0.0]))


def test_mismatched_inputs_are_refused():
    with pytest.raises(DataError, match="do not match the 2 classes"):
        isic_scores(np.array([0]), np.array([[0.2, 0.3, 0.5]]), ["a", "b"])
