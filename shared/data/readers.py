"""One entry point to every dataset reader, and recognition of a folder's format by its files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from shared.data import ham10000, image_folder, isic2019, isic2020
from shared.data.records import ImageTable
from shared.errors import ConfigError, DataError

READERS: dict[str, Callable[..., ImageTable]] = {
    "ham10000": ham10000.read_ham10000,
    "isic2019": isic2019.read_isic2019,
    "isic2020": isic2020.read_isic2020,
    "folder": image_folder.read_image_folder,
}
"""Reader of every on-disk format; each takes the dataset folder and `skip_bad`."""

EXPECTED_LAYOUTS = {
    "ham10000": ham10000.EXPECTED_LAYOUT,
    "isic2019": isic2019.EXPECTED_LAYOUT,
    "isic2020": isic2020.EXPECTED_LAYOUT,
    "folder": image_folder.EXPECTED_LAYOUT,
}

_MARKER_FILES = {
    "ham10000": ham10000.METADATA_FILE,
    "isic2019": isic2019.GROUND_TRUTH_FILE,
    "isic2020": isic2020.LABELS_FILE,
}


def read_dataset(root: Path, format: str, *, skip_bad: bool = False) -> ImageTable:
    """Read a dataset folder in the named format into an `ImageTable` with absolute image paths."""
    if format == "demo":
        raise ConfigError(
            "format 'demo' names no folder to read: the demo dataset is written by "
            "shared.data.demo.ensure_demo_dataset (skin-fl-sim without --data) and read as 'ham10000'"
        )
    reader = READERS.get(format)
    if reader is None:
        raise ConfigError(f"unknown data format {format!r}; use one of {', '.join(READERS)}")
    return reader(Path(root), skip_bad=skip_bad)


def detect_format(root: Path) -> str:
    """The format of a dataset folder, recognised by its label files or its class sub-folders."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist or is not a folder; give the folder that holds the dataset")
    for format_name, marker in _MARKER_FILES.items():
        if (root / marker).is_file():
            return format_name
    if image_folder.looks_like_image_folder(root):
        return "folder"
    expected = "; ".join(f"{name}: {layout}" for name, layout in EXPECTED_LAYOUTS.items())
    raise DataError(
        f"cannot tell the format of {root}: it matches none of the known layouts ({expected}); "
        "point to the folder that holds one of them, or name the format with --format"
    )
