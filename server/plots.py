"""PNG plot of the run's metrics per round."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

_PLOTTED = (
    ("eval", "balanced-accuracy", "balanced accuracy (pooled test)"),
    ("eval", "mean-site-balanced-accuracy", "balanced accuracy (mean of sites)"),
    ("eval", "accuracy", "accuracy"),
    ("eval", "macro-auc", "macro AUC"),
)


def plot_history(rounds: list[dict], path: Path) -> Path | None:
    """Plot evaluation metrics and losses per round; returns the path, or None with no rounds."""
    if not rounds:
        return None
    numbers = [entry["round"] for entry in rounds]
    figure, (quality, losses) = plt.subplots(1, 2, figsize=(11, 4))
    for _, key, label in _PLOTTED:
        values = [entry["evaluate"].get(key) for entry in rounds]
        if any(value is not None for value in values):
            quality.plot(numbers, [v if v is not None else float("nan") for v in values], marker="o", label=label)
    quality.set(xlabel="round", ylabel="score", ylim=(0, 1), title="Global model on site test splits")
    quality.legend(loc="lower right", fontsize=8)
    quality.grid(alpha=0.3)
    for phase, key, label in (("train", "train-loss", "train loss"), ("evaluate", "loss", "test loss")):
        values = [entry[phase].get(key) for entry in rounds]
        if any(value is not None for value in values):
            losses.plot(numbers, [v if v is not None else float("nan") for v in values], marker="o", label=label)
    losses.set(xlabel="round", ylabel="loss", title="Loss")
    losses.legend(fontsize=8)
    losses.grid(alpha=0.3)
    for axis in (quality, losses):
        axis.set_xticks(numbers)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
