"""Plain-text result tables for the simulation and the evaluation commands."""

from __future__ import annotations

_COLUMNS = (("test images", "num_examples", "{:d}"), ("balanced acc", "balanced_accuracy", "{:.3f}"),
            ("accuracy", "accuracy", "{:.3f}"), ("macro AUC", "macro_auc", "{:.3f}"))


def _cell(metrics: dict, key: str, pattern: str) -> str:
    value = metrics.get(key)
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return pattern.format(int(value) if pattern == "{:d}" else float(value))


def format_result_table(title: str, per_site: dict[str, dict], overall: dict) -> str:
    """A table with one row per site plus the overall row (pooled counts over all sites)."""
    rows = [(site, metrics) for site, metrics in sorted(per_site.items())] + [("overall", overall)]
    headers = ["site"] + [header for header, _, _ in _COLUMNS]
    body = [[name] + [_cell(metrics, key, pattern) for _, key, pattern in _COLUMNS] for name, metrics in rows]
    widths = [max(len(row[index]) for row in [headers] + body) for index in range(len(headers))]

    def line(cells):
        return "  ".join(cell.ljust(width) if index == 0 else cell.rjust(width) for index, (cell, width) in enumerate(zip(cells, widths)))

    rule = "-" * len(line(headers))
    return "\n".join([title, rule, line(headers), rule, *[line(row) for row in body[:-1]], rule, line(body[-1])])


def site_metrics_from_flower(metrics: dict) -> dict:
    """Flower's kebab-case site metrics in the snake_case keys of the tables."""
    return {
        "num_examples": metrics.get("num-examples"),
        "balanced_accuracy": metrics.get("balanced-accuracy"),
        "accuracy": metrics.get("accuracy"),
        "macro_auc": metrics.get("macro-auc"),
        "mean_site_balanced_accuracy": metrics.get("mean-site-balanced-accuracy"),
    }


def handed_on_model(history) -> str:
    """Which global model a run's result table shows: the selected round's, or the last round's."""
    if history.selected_round is not None:
        return f"global model of round {history.selected_round} (best validation balanced accuracy)"
    return "last round's global model"
