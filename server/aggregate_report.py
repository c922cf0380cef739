"""The coordinator's report, built from the aggregate metrics the sites send (never from images)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from shared.durable_files import write_json_atomically
from shared.errors import DataError
from shared.json_values import finite_or_none
from shared.metrics import metrics_from_confusion
from shared.report_files import plot_confusion_matrix, write_table

AGGREGATE_TABLE_COLUMNS = ("support", "recall", "precision", "auc")


def write_aggregate_report(
    folder: Path, per_site: dict[str, dict], classes: list[str], *, title: str = "all sites", extra: dict | None = None
) -> dict:
    """The coordinator's report from the sites' aggregate metrics: pooled confusion matrix, per-class table, JSON.

    Each site entry holds its `confusion-matrix` (flattened counts), `num-examples` and optionally
    `per-class-auc`, `balanced-accuracy`, `macro-auc`, as the sites send them. ROC curves need
    per-image scores, which never leave a site, so the coordinator's folder has none.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    size = len(classes)
    pooled = np.zeros((size, size), dtype=np.int64)
    sites = {}
    for site, metrics in sorted(per_site.items()):
        flat = np.asarray(metrics.get("confusion-matrix", []), dtype=np.int64)
        if flat.size != size * size:
            raise DataError(f"site {site} sent {flat.size} confusion counts for {size} classes; sites and server must use one class list")
        confusion = flat.reshape(size, size)
        pooled += confusion
        sites[site] = {
            "num_examples": int(metrics.get("num-examples", confusion.sum())),
            **{key.replace("-", "_"): finite_or_none(value)
               for key, value in metrics.items() if key not in ("confusion-matrix", "num-examples")},
            "confusion_matrix": confusion.tolist(),
        }
    summary = metrics_from_confusion(pooled)
    support = pooled.sum(axis=1)
    rows = {}
    for index, name in enumerate(classes):
        aucs = [
            (entry["per_class_auc"][index], entry["num_examples"])
            for entry in sites.values()
            if entry.get("per_class_auc") and entry["per_class_auc"][index] is not None
        ]
        weight = sum(count for _, count in aucs)
        rows[name] = {
            "support": int(support[index]),
            "recall": summary["recall"][index],
            "precision": summary["precision"][index],
            "auc": sum(value * count for value, count in aucs) / weight if weight else None,
        }
    write_table(folder, rows, AGGREGATE_TABLE_COLUMNS)
    plot_confusion_matrix(pooled, classes, folder / "confusion_matrix.png", f"{title}: pooled confusion matrix")
    mean_site_balanced = [entry.get("balanced_accuracy") for entry in sites.values() if entry.get("balanced_accuracy") is not None]
    report = {
        "scope": "aggregate metrics sent by the sites (confusion counts, per-class AUCs); no images or per-image scores",
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "classes": classes,
        "num_examples": int(pooled.sum()),
        "pooled": {
            "accuracy": summary["accuracy"],
            "balanced_accuracy": summary["balanced_accuracy"],
            "confusion_matrix": pooled.tolist(),
            "per_class": rows,
        },
        "mean_site_balanced_accuracy": float(np.mean(mean_site_balanced)) if mean_site_balanced else None,
        "sites": sites,
        **(extra or {}),
    }
    write_json_atomically(folder / "report.json", report)
    return report
