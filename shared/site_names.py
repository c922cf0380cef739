"""A site's name as one safe path component: the folder of its cache, reports and synthetic images."""

from __future__ import annotations

import re


def safe_site_name(site: str) -> str:
    """`site` with every run of characters outside letters, digits, '_', '.' and '-' made one '_' ("St Mary's" -> "St_Mary_s")."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", site).strip("_") or "site"
