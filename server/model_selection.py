"""Which round's global model a run hands on: the best by the sites' pooled validation balanced accuracy, or the last."""

from __future__ import annotations

from server.history import MetricHistory
from shared.protocol import VALIDATION_BALANCED_ACCURACY_KEY


def best_validation_round(history: MetricHistory) -> int | None:
    """The round whose global model scored the best validation balanced accuracy over all sites (latest on ties).

    None when no round has validation figures (sites without validation images, or an older site version).
    """
    scored = [
        (entry["evaluate"][VALIDATION_BALANCED_ACCURACY_KEY], entry["round"])
        for entry in history.as_list()
        if entry["evaluate"].get(VALIDATION_BALANCED_ACCURACY_KEY) is not None
    ]
    return max(scored)[1] if scored else None


def rounds_since_best_validation(history: MetricHistory) -> int | None:
    """Evaluated rounds since the best validation balanced accuracy (0: the last round is the best; None: no figures)."""
    best = best_validation_round(history)
    if best is None:
        return None
    evaluated = [entry["round"] for entry in history.as_list() if entry["evaluate"].get(VALIDATION_BALANCED_ACCURACY_KEY) is not None]
    return sum(1 for server_round in evaluated if server_round > best)
