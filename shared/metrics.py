"""Classification metrics of a site or a pooled test set, exact aggregation from confusion counts, tables."""

from __future__ import annotations

import numpy as np

from shared.errors import DataError, ModelError

MELANOMA_CLASSES = ("mel", "malignant")
"""The melanoma class: 'mel' in HAM10000 / ISIC 2019, 'malignant' in binary ISIC 2020 data."""


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0


def binary_roc_auc(is_positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for the `is_positive` images, as scikit-learn's `roc_auc_score`.

    The same steps in the same floating-point order (curve at each distinct score, collinear
    points dropped, trapezoids), so the value is identical; it spares a site's every round the
    import of scikit-learn. Needs both positives and negatives.
    """
    is_positive = np.asarray(is_positive, dtype=bool)
    scores = np.asarray(scores)
    if not np.all(np.isfinite(scores)):
        raise ModelError("the model gave non-finite probabilities (NaN or inf); check the training loss and learning rate")
    order = np.argsort(scores, kind="stable")[::-1]
    sorted_scores, sorted_positive = scores[order], is_positive[order].astype(np.float64)
    # The curve's points: the last image of each run of tied scores.
    thresholds = np.r_[np.nonzero(np.diff(sorted_scores))[0], sorted_scores.size - 1]
    true_positives = np.cumsum(sorted_positive)[thresholds]
    false_positives = 1 + thresholds.astype(np.float64) - true_positives
    if false_positives.size > 2:
        corners = np.r_[True, np.logical_or(np.diff(false_positives, 2), np.diff(true_positives, 2)), True]
        true_positives, false_positives = true_positives[corners], false_positives[corners]
    true_positives, false_positives = np.r_[0.0, true_positives], np.r_[0.0, false_positives]
    if true_positives[-1] <= 0 or false_positives[-1] <= 0:
        raise DataError("ROC AUC needs both positive and negative images; give labels of both kinds")
    true_rate, false_rate = true_positives / true_positives[-1], false_positives / false_positives[-1]
    return float(np.sum((false_rate[1:] - false_rate[:-1]) * (true_rate[1:] + true_rate[:-1]) / 2.0, dtype=np.float64))


def metrics_from_confusion(confusion: np.ndarray) -> dict:
    """Accuracy, balanced accuracy and per-class recall / precision from a (summed) confusion matrix.

    Rows are true classes. Balanced accuracy is the mean recall over classes with images;
    a class without images (or without predictions) gets recall (precision) 0, as scikit-learn's
    `zero_division=0` does.
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise DataError(f"a confusion matrix must be square, got shape {confusion.shape}")
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    true_positives = np.diag(confusion)
    total = int(confusion.sum())
    present = support > 0
    return {
        "num_examples": total,
        "accuracy": _ratio(true_positives.sum(), total) if total else None,
        "balanced_accuracy": float(np.mean(true_positives[present] / support[present])) if present.any() else None,
        "recall": [_ratio(tp, count) for tp, count in zip(true_positives, support)],
        "precision": [_ratio(tp, count) for tp, count in zip(true_positives, predicted)],
    }


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict:
    """JSON-ready metrics of predicted class probabilities [N, K] against true labels [N]."""
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    num_classes = len(classes)
    if probabilities.ndim != 2 or probabilities.shape[1] != num_classes:
        raise ModelError(
            f"the model gives probabilities of shape {probabilities.shape} but the class list has {num_classes} "
            "classes; evaluate with the class list the model was trained with"
        )
    if labels.shape != (probabilities.shape[0],):
        raise DataError(f"{labels.shape} labels for {probabilities.shape[0]} predictions; give one label per image")
    if labels.size == 0:
        raise DataError("no images to evaluate; give a test split with at least one image")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"labels must lie in 0..{num_classes - 1} (classes {classes}); got {labels.min()}..{labels.max()}")

    predictions = probabilities.argmax(axis=1)
    confusion = np.bincount(labels * num_classes + predictions, minlength=num_classes**2).reshape(num_classes, num_classes)
    counts = metrics_from_confusion(confusion)
    per_class = {}
    aucs = []
    for index, name in enumerate(classes):
        precision, recall = counts["precision"][index], counts["recall"][index]
        is_class = labels == index
        # AUC needs both positives and negatives of this class among the labels.
        auc = binary_roc_auc(is_class, probabilities[:, index]) if 0 < is_class.sum() < labels.size else None
        if auc is not None:
            aucs.append(auc)
        per_class[name] = {
            "precision": precision,
            "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall),
            "auc": auc,
            "support": int(is_class.sum()),
        }
    melanoma_sensitivity = melanoma_specificity = None
    melanoma = next((name for name in MELANOMA_CLASSES if name in classes), None)
    if melanoma is not None:
        index = classes.index(melanoma)
        is_melanoma, called_melanoma = labels == index, predictions == index
        if is_melanoma.any():
            melanoma_sensitivity = float((called_melanoma & is_melanoma).sum() / is_melanoma.sum())
        if (~is_melanoma).any():
            melanoma_specificity = float((~called_melanoma & ~is_melanoma).sum() / (~is_melanoma).sum())
    return {
        "num_examples": int(labels.size),
        "accuracy": counts["accuracy"],
        "balanced_accuracy": counts["balanced_accuracy"],
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "melanoma_sensitivity": melanoma_sensitivity,
        "melanoma_specificity": melanoma_specificity,
    }


def format_metrics_table(rows: dict[str, dict], columns: list[str] | tuple[str, ...]) -> str:
    """Aligned plain-text table: one line per row name, one column per metric (floats to 3 places, None as -)."""

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, (float, np.floating)):
            return "nan" if np.isnan(value) else f"{value:.3f}"
        return str(value)

    names = list(rows)
    cells = [[cell(rows[name].get(column)) for column in columns] for name in names]
    name_width = max([len(name) for name in names] + [0])
    widths = [max([len(column)] + [len(line[position]) for line in cells]) for position, column in enumerate(columns)]
    header = " " * name_width + "".join(f"  {column:>{width}}" for column, width in zip(columns, widths))
    lines = [header]
    for name, line in zip(names, cells):
        lines.append(f"{name:<{name_width}}" + "".join(f"  {value:>{width}}" for value, width in zip(line, widths)))
    return "\n".join(line.rstrip() for line in lines)
