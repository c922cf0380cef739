"""Files of a report that the site's and the coordinator's reports share: the per-class table and the confusion-matrix plot."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

from shared.metrics import format_metrics_table  # noqa: E402


def write_table(folder: Path, rows: dict[str, dict], columns: tuple[str, ...]) -> None:
    """per_class.csv and an aligned per_class.txt."""
    with open(folder / "per_class.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", *columns])
        for name, row in rows.items():
            writer.writerow([name, *("" if row.get(column) is None else row.get(column) for column in columns)])
    (folder / "per_class.txt").write_text(format_metrics_table(rows, list(columns)) + "\n")


def plot_confusion_matrix(confusion: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    """Confusion counts with cells shaded by the row (true-class) fraction."""
    confusion = np.asarray(confusion, dtype=np.int64)
    rows = confusion.sum(axis=1, keepdims=True)
    fractions = np.divide(confusion, rows, out=np.zeros(confusion.shape, dtype=np.float64), where=rows > 0)
    size = 1.2 + 0.6 * len(classes)
    figure, axis = plt.subplots(figsize=(size + 1.2, size))
    image = axis.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    for row in range(len(classes)):
        for column in range(len(classes)):
            axis.text(column, row, str(confusion[row, column]), ha="center", va="center", fontsize=8,
                      color="white" if fractions[row, column] > 0.5 else "black")
    axis.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true", title=title)
    axis.set_xticklabels(classes, rotation=45, ha="right")
    axis.set_yticklabels(classes)
    figure.colorbar(image, ax=axis, fraction=0.046, label="fraction of the true class")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
