"""The skin-fl-bench table: mean and standard deviation over seeds of every arm's cells, as CSV, Markdown and PNG."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

COLUMNS = (
    ("balanced_accuracy", "bal. acc (final)", lambda cell: cell["final"]["balanced_accuracy"]),
    ("selected_balanced_accuracy", "bal. acc (val-selected)", lambda cell: cell["selected"]["balanced_accuracy"]),
    ("site_mean_balanced_accuracy", "bal. acc (mean over sites)", lambda cell: _site_mean(cell, "balanced_accuracy")),
    ("site_mean_balanced_accuracy_global", "bal. acc (mean over sites, global model)", lambda cell: _site_mean(cell, "balanced_accuracy", "per_site_global")),
    ("prior_corrected_balanced_accuracy", "bal. acc (prior-corrected)", lambda cell: _prior_corrected(cell, "balanced_accuracy")),
    ("refit_balanced_accuracy", "bal. acc (head refit + prior)", lambda cell: _refit(cell, "balanced_accuracy")),
    ("macro_auc", "macro AUC", lambda cell: cell["final"]["macro_auc"]),
    ("refit_macro_auc", "macro AUC (head refit)", lambda cell: cell.get("calibration", {}).get("head_refit", {}).get("refitted_test", {}).get("macro_auc")),
    ("melanoma_sensitivity", "mel. sensitivity", lambda cell: cell["final"]["melanoma_sensitivity"]),
    ("prior_corrected_melanoma_sensitivity", "mel. sensitivity (prior-corrected)", lambda cell: _prior_corrected(cell, "melanoma_sensitivity")),
    ("refit_melanoma_sensitivity", "mel. sensitivity (head refit + prior)", lambda cell: _refit(cell, "melanoma_sensitivity")),
    ("min_melanoma_sensitivity_after_round_2", "worst mel. sens. / best (rounds > 2)", lambda cell: _melanoma_stability(cell)),
    ("test_ece", "ECE", lambda cell: cell.get("calibration", {}).get("test_ece")),
    ("test_ece_calibrated", "ECE calibrated", lambda cell: cell.get("calibration", {}).get("test_ece_calibrated")),
    ("wall_seconds", "wall s", lambda cell: cell["wall_seconds"]),
)


def _prior_corrected(cell: dict, metric: str) -> float | None:
    """A test figure of the last round's model after temperature and class-prior correction."""
    return cell.get("calibration", {}).get("prior_corrected", {}).get(metric)


def _refit(cell: dict, metric: str) -> float | None:
    """A test figure of the model a run hands on: head refit, then temperature and class-prior correction."""
    return cell.get("calibration", {}).get("head_refit", {}).get("prior_corrected", {}).get(metric)


def _site_mean(cell: dict, metric: str, which: str = "per_site") -> float | None:
    values = [figures[metric] for figures in cell.get(which, {}).values() if figures.get(metric) is not None]
    return float(np.mean(values)) if values else None


def _melanoma_stability(cell: dict) -> float | None:
    """Lowest melanoma sensitivity after round 2 over the best one of the run (1 = never falls)."""
    values = [entry["test"]["melanoma_sensitivity"] for entry in cell["rounds"]]
    if any(value is None for value in values) or max(values) == 0:
        return None
    later = values[2:] or values
    return float(min(later) / max(values))


def load_cells(out: Path) -> list[dict]:
    """Every finished cell in the results folder."""
    return [json.loads(path.read_text()) for path in sorted((Path(out) / "cells").glob("*.json"))]


def summarise(cells: list[dict], arms: list[str]) -> list[dict]:
    """One row per arm: number of seeds, and mean / sd of every column over them."""
    rows = []
    for arm in arms:
        mine = [cell for cell in cells if cell["arm"] == arm]
        if not mine:
            continue
        row = {"arm": arm, "seeds": len(mine)}
        for key, _, value_of in COLUMNS:
            values = [value for value in (value_of(cell) for cell in mine) if value is not None]
            row[f"{key}_mean"] = float(np.mean(values)) if values else None
            row[f"{key}_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0 if values else None
        rows.append(row)
    return rows


def _cell_text(row: dict, key: str) -> str:
    mean, sd = row[f"{key}_mean"], row[f"{key}_sd"]
    if mean is None:
        return "-"
    if key == "wall_seconds":
        return f"{mean:.0f} ± {sd:.0f}"
    return f"{mean:.3f} ± {sd:.3f}"


def markdown_table(rows: list[dict]) -> str:
    """The table as Markdown, mean ± sd over seeds."""
    header = "| arm | seeds | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|" + " --- |" * (len(COLUMNS) + 2)
    lines = [header, rule]
    for row in rows:
        lines.append(f"| {row['arm']} | {row['seeds']} | " + " | ".join(_cell_text(row, key) for key, _, _ in COLUMNS) + " |")
    return "\n".join(lines)


def write_chart(rows: list[dict], path: Path) -> None:
    """Bar chart of balanced accuracy (final and val-selected) per arm with sd error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [row["arm"] for row in rows]
    positions = np.arange(len(arms))
    figure, axis = plt.subplots(figsize=(max(5, 1.2 * len(arms) + 2), 4))
    for offset, (key, label) in zip((-0.2, 0.2), (("balanced_accuracy", "final"), ("selected_balanced_accuracy", "val-selected"))):
        means = [row[f"{key}_mean"] or 0.0 for row in rows]
        sds = [row[f"{key}_sd"] or 0.0 for row in rows]
        axis.bar(positions + offset, means, width=0.4, yerr=sds, capsize=3, label=label)
    axis.set_xticks(positions, arms)
    axis.set_ylabel("balanced accuracy (pooled test split)")
    axis.set_ylim(0, 1)
    axis.legend()
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_table(out: Path, arms: list[str]) -> str:
    """Write table.csv, table.md and table.png from the finished cells; return the Markdown."""
    out = Path(out)
    rows = summarise(load_cells(out), arms)
    if not rows:
        return "no finished cells yet"
    with (out / "table.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = markdown_table(rows)
    (out / "table.md").write_text(text + "\n")
    write_chart(rows, out / "table.png")
    return text
