"""JSON-ready values: NaN and infinities (which JSON cannot hold) become None, through lists and dicts."""

from __future__ import annotations

import math


def finite_or_none(value):
    """`value` with every non-finite float, at any depth of lists and dicts, replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite_or_none(item) for item in value]
    return value
