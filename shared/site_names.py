"""A site's name made safe for paths: a folder name (cache, reports, synthetic images) and a key-file stem."""

from __future__ import annotations

import hashlib
import re
import unicodedata


def safe_site_name(site: str) -> str:
    """`site` with every run of characters outside letters, digits, '_', '.' and '-' made one '_' ("St Mary's" -> "St_Mary_s")."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", site).strip("_") or "site"


def site_file_stem(site: str) -> str:
    """File-name-safe stem for a site name ("St Mary's" -> "st-marys", "Charité" -> "charite")."""
    ascii_name = unicodedata.normalize("NFKD", site).encode("ascii", "ignore").decode("ascii").replace("'", "")
    stem = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")
    if not stem:
        # A name with no ASCII letters or digits still needs a stable, distinct file name.
        stem = "site-" + hashlib.sha256(site.encode("utf-8")).hexdigest()[:10]
    return stem
