"""Per-round metrics of a run as TensorBoard event files in its run folder (`tensorboard --logdir RUN_FOLDER`)."""

from __future__ import annotations

from pathlib import Path

from shared.extras import require_extra

FOLDER = "tensorboard"
# Aggregate figures charted per round: (history section, metric key, TensorBoard tag).
ROUND_SCALARS = (
    ("train", "train-loss", "train/loss"),
    ("evaluate", "loss", "test/loss"),
    ("evaluate", "balanced-accuracy", "test/balanced_accuracy"),
    ("evaluate", "accuracy", "test/accuracy"),
    ("evaluate", "macro-auc", "test/macro_auc"),
    ("evaluate", "melanoma-sensitivity", "test/melanoma_sensitivity"),
    ("evaluate", "val-balanced-accuracy", "validation/balanced_accuracy"),
)
SITE_SCALARS = (("train", "train-loss", "train_loss"), ("evaluate", "balanced-accuracy", "balanced_accuracy"))


class TensorBoardLog:
    """Writes each finished round of the metric history as scalars, one event file per server run."""

    def __init__(self, run_folder: Path):
        require_extra("tracking", "TensorBoard logging (tensorboard = true / --tensorboard)")
        from tensorboardX import SummaryWriter

        self.folder = Path(run_folder) / FOLDER
        self.writer = SummaryWriter(logdir=str(self.folder))

    def write_round(self, entry: dict) -> None:
        """Scalars of one history entry (aggregates, sites that answered, seconds, each site's own figures)."""
        step = entry["round"]
        for section, key, tag in ROUND_SCALARS:
            value = (entry.get(section) or {}).get(key)
            if isinstance(value, (int, float)):
                self.writer.add_scalar(tag, float(value), step)
        self.writer.add_scalar("sites/trained", len(entry.get("train_sites", [])), step)
        self.writer.add_scalar("sites/evaluated", len(entry.get("evaluate_sites", [])), step)
        seconds = (entry.get("train_wall_seconds") or 0.0) + (entry.get("evaluate_wall_seconds") or 0.0)
        self.writer.add_scalar("round/seconds", seconds, step)
        for site, metrics in sorted(entry.get("sites", {}).items()):
            for section, key, name in SITE_SCALARS:
                value = (metrics.get(section) or {}).get(key)
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"site/{site}/{name}", float(value), step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()
