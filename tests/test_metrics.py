"""Tests of the classification metrics against scikit-learn, exact aggregation from confusion counts, tables."""

import json

import numpy as np
import pytest
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from shared.errors import DataError, ModelError
from shared.metrics import binary_roc_auc, classification_metrics, format_metrics_table, metrics_from_confusion

CLASSES = ["akiec", "bcc", "mel", "nv"]


def _random_predictions(num_examples: int, labels_from: list[int], seed: int):
    random = np.random.default_rng(seed)
    labels = random.choice(labels_from, size=num_examples)
    probabilities = random.dirichlet(np.ones(len(CLASSES)), size=num_examples)
    # Lean towards the true class so the metrics are not all near chance.
    probabilities[np.arange(num_examples), labels] += random.uniform(0, 0.6, size=num_examples)
    return labels, probabilities / probabilities.sum(axis=1, keepdims=True)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_metrics_match_scikit_learn_with_a_class_absent_from_the_labels():
    labels, probabilities = _random_predictions(200, labels_from=[0, 2, 3], seed=0)  # no "bcc"
    predictions = probabilities.argmax(axis=1)

    metrics = classification_metrics(labels, probabilities, CLASSES)

    assert metrics["num_examples"] == 200
    assert metrics["accuracy"] == pytest.approx(np.mean(predictions == labels))
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predictions))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=range(len(CLASSES)), zero_division=0
    )
    aucs = []
    for index, name in enumerate(CLASSES):
        row = metrics["per_class"][name]
        assert row["precision"] == pytest.approx(precision[index])
        assert row["recall"] == pytest.approx(recall[index])
        assert row["f1"] == pytest.approx(f1[index])
        assert row["support"] == support[index]
        if name == "bcc":
            assert row["auc"] is None
        else:
            aucs.append(roc_auc_score(labels == index, probabilities[:, index]))
            assert row["auc"] == pytest.approx(aucs[-1])
    assert metrics["macro_auc"] == pytest.approx(np.mean(aucs))
    assert metrics["confusion_matrix"] == confusion_matrix(labels, predictions, labels=range(len(CLASSES))).tolist()
    json.dumps(metrics)


def test_macro_auc_matches_scikit_learn_one_vs_rest_when_every_class_is_present():
    labels, probabilities = _random_predictions(150, labels_from=[0, 1, 2, 3], seed=1)
    metrics = classification_metrics(labels, probabilities, CLASSES)
    assert metrics["macro_auc"] == pytest.approx(roc_auc_score(labels, probabilities, multi_class="ovr", average="macro"))


@pytest.mark.parametrize("seed", range(40))
def test_binary_roc_auc_equals_scikit_learn_exactly(seed):
    random = np.random.default_rng(seed)
    size = int(random.integers(2, 400))
    is_positive = random.random(size) < random.uniform(0.05, 0.95)
    is_positive[:2] = [True, False]
    # Coarse scores make many ties (as float16/AMP probabilities and small test splits do); fine ones make none.
    scores = random.random(size)
    if seed % 2:
        scores = np.round(scores, int(random.integers(1, 3)))
    assert binary_roc_auc(is_positive, scores) == roc_auc_score(is_positive, scores)
    assert binary_roc_auc(is_positive, scores.astype(np.float32)) == roc_auc_score(is_positive, scores.astype(np.float32))


def test_binary_roc_auc_of_perfect_reversed_and_constant_scores():
    is_positive = np.array([True, True, False, False, False])
    assert binary_roc_auc(is_positive, np.array([0.9, 0.8, 0.3, 0.2, 0.1])) == 1.0
    assert binary_roc_auc(is_positive, np.array([0.1, 0.2, 0.3, 0.8, 0.9])) == 0.0
    assert binary_roc_auc(is_positive, np.full(5, 0.5)) == 0.5


def test_binary_roc_auc_refuses_one_kind_of_label_and_non_finite_scores():
    with pytest.raises(DataError, match="both positive and negative"):
        binary_roc_auc(np.array([True, True]), np.array([0.2, 0.4]))
    with pytest.raises(ModelError, match="non-finite"):
        binary_roc_auc(np.array([True, False]), np.array([np.nan, 0.4]))


def test_melanoma_sensitivity_and_specificity():
    labels, probabilities = _random_predictions(120, labels_from=[0, 1, 2, 3], seed=2)
    predictions = probabilities.argmax(axis=1)
    metrics = classification_metrics(labels, probabilities, CLASSES)
    melanoma = CLASSES.index("mel")
    true_negatives = np.sum((labels != melanoma) & (predictions != melanoma))
    assert metrics["melanoma_sensitivity"] == pytest.approx(metrics["per_class"]["mel"]["recall"])
    assert metrics["melanoma_specificity"] == pytest.approx(true_negatives / np.sum(labels != melanoma))

    binary_probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    binary = classification_metrics(np.array([0, 1, 1, 0]), binary_probabilities, ["benign", "malignant"])
    assert (binary["melanoma_sensitivity"], binary["melanoma_specificity"]) == (0.5, 0.5)

    without = classification_metrics(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]), ["nv", "bkl"])
    assert without["melanoma_sensitivity"] is None and without["melanoma_specificity"] is None


def test_summed_site_confusions_give_the_pooled_figures_exactly():
    site_a = _random_predictions(80, labels_from=[0, 1, 2], seed=3)
    site_b = _random_predictions(50, labels_from=[2, 3], seed=4)
    per_site = [classification_metrics(labels, probabilities, CLASSES) for labels, probabilities in (site_a, site_b)]
    pooled_labels = np.concatenate([site_a[0], site_b[0]])
    pooled_predictions = np.concatenate([site_a[1], site_b[1]]).argmax(axis=1)

    pooled = metrics_from_confusion(np.sum([metrics["confusion_matrix"] for metrics in per_site], axis=0))

    assert pooled["num_examples"] == 130
    assert pooled["accuracy"] == pytest.approx(np.mean(pooled_predictions == pooled_labels))
    assert pooled["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(pooled_labels, pooled_predictions))
    precision, recall, _, _ = precision_recall_fscore_support(
        pooled_labels, pooled_predictions, labels=range(len(CLASSES)), zero_division=0
    )
    np.testing.assert_allclose(pooled["recall"], recall)
    np.testing.assert_allclose(pooled["precision"], precision)


def test_probabilities_for_another_class_list_are_refused():
    with pytest.raises(ModelError, match="probabilities of shape \\(2, 3\\) but the class list has 4 classes"):
        classification_metrics(np.array([0, 1]), np.full((2, 3), 1 / 3), CLASSES)


def test_metrics_table_is_aligned_and_shows_missing_values_as_dashes():
    table = format_metrics_table(
        {"mel": {"recall": 0.5, "auc": None, "support": 12}, "vasc": {"recall": 1.0, "auc": 0.75, "support": 3}},
        ["recall", "auc", "support"],
    )
    lines = table.splitlines()
    assert lines[0].split() == ["recall", "auc", "support"]
    assert lines[1].split() == ["mel", "0.500", "-", "12"]
    assert lines[2].split() == ["vasc", "1.000", "0.750", "3"]
    assert len({len(line) for line in lines}) == 1
