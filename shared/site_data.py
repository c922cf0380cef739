"""One site's images made ready to train on: class alignment, lesion-grouped split, image cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

from shared.config import PreprocessConfig
from shared.data.cache import CachedImages, build_image_cache
from shared.data.records import ImageTable
from shared.data.splits import split_by_group
from shared.errors import DataError
from shared.site_names import safe_site_name


def align_classes(table: ImageTable, classes: list[str]) -> ImageTable:
    """Re-express a table in the run's class list; labels outside it are an error."""
    foreign = sorted(set(table.frame["label"]) - set(classes))
    if foreign:
        raise DataError(
            f"{table.root}: labels {foreign} are not among the run's classes {classes}; "
            "relabel or remove those images, or start the run with a class list that includes them"
        )
    return ImageTable(
        frame=table.frame, classes=list(classes), format=table.format, root=table.root, skipped=table.skipped
    )


def site_cache_dir(cache_root: Path, site: str, preprocess: PreprocessConfig) -> Path:
    """The cache folder of one site at one preprocessing setting (sizes live side by side)."""
    safe_site = safe_site_name(site)
    options = preprocess.model_dump_json()
    tag = f"{preprocess.image_size}px-{hashlib.sha256(options.encode()).hexdigest()[:8]}"
    return Path(cache_root) / safe_site / tag


def prepare_site_images(
    table: ImageTable,
    *,
    site: str,
    classes: list[str],
    split_fractions: tuple[float, float, float],
    seed: int,
    cache_root: Path,
    preprocess: PreprocessConfig,
    skip_bad: bool = False,
    progress: bool = True,
) -> CachedImages:
    """Split a site's table by lesion (unless already split) and decode it into its cache."""
    aligned = align_classes(table, classes)
    if "split" not in aligned.frame.columns:
        aligned = split_by_group(aligned, fractions=split_fractions, seed=seed)
    return build_image_cache(
        aligned, site_cache_dir(cache_root, site, preprocess), preprocess, skip_bad=skip_bad, progress=progress
    )


TABLE_CSV_COLUMNS = ("image_id", "path", "label", "group", "site", "split")


def save_table_csv(table: ImageTable, path: Path) -> Path:
    """Write a (split) site table as CSV: image ids, paths, labels, groups, sites, splits."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = [column for column in TABLE_CSV_COLUMNS if column in table.frame.columns]
    table.frame[columns].to_csv(path, index=False)
    return path


def load_table_csv(path: Path, classes: list[str], format: str = "manifest") -> ImageTable:
    """Read a table written by `save_table_csv` back, with the given class list."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"site table {path} does not exist; prepare the sites again (rerun skin-fl-sim)")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    return align_classes(ImageTable(frame=frame, classes=list(classes), format=format, root=path.parent), classes)
