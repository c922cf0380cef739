"""The per-site image cache: every image decoded and resized once into one memory-mapped array."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared.config import PreprocessConfig
from shared.data.images import decode_image
from shared.data.records import SPLITS, ImageTable, SkippedRow
from shared.data.transforms import preprocess_image
from shared.device import usable_cpu_count
from shared.errors import DataError
from shared.progress import progress as show_progress

CACHE_FORMAT_VERSION = 1
"""Bump when the cached pixels of an unchanged source would differ, so old caches are rebuilt."""

IMAGES_FILE = "images.npy"
INDEX_FILE = "index.json"


@dataclass
class CachedImages:
    """Preprocessed images of one site (or a pooled set) with their labels and splits.

    `images` is uint8 [N, S, S, 3], usually a read-only memory map of the cache file;
    `source` names where the images come from (cache folder and split) in error messages.
    """

    images: np.ndarray
    labels: np.ndarray
    image_ids: list[str]
    splits: np.ndarray
    classes: list[str]
    skipped: list[SkippedRow] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, split: str) -> CachedImages:
        """The images of one split; a view without copying when the split's rows are contiguous."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {list(SPLITS)}")
        rows = np.flatnonzero(self.splits == split)
        if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
            # Caches store rows grouped by split, so this is the usual case and keeps the memory map.
            rows = slice(int(rows[0]), int(rows[-1]) + 1)
        return CachedImages(
            images=self.images[rows],
            labels=self.labels[rows],
            image_ids=list(np.asarray(self.image_ids, dtype=object)[rows]),
            splits=self.splits[rows],
            classes=list(self.classes),
            skipped=list(self.skipped),
            source=f"{self.source} [{split}]",
        )

    def class_counts(self) -> np.ndarray:
        """Number of images of every class, in class order."""
        return np.bincount(self.labels, minlength=len(self.classes)).astype(np.int64)


def concatenate(caches: list[CachedImages]) -> CachedImages:
    """Pool several sites' images (same class list) into one in-memory set."""
    if not caches:
        raise ValueError("concatenate needs at least one set of images")
    classes = caches[0].classes
    for cache in caches[1:]:
        if cache.classes != classes:
            raise DataError(
                f"cannot pool {cache.source} (classes {cache.classes}) with {caches[0].source} (classes {classes}); "
                "prepare every site with the run's class list"
            )
    return CachedImages(
        images=np.concatenate([cache.images for cache in caches]),
        labels=np.concatenate([cache.labels for cache in caches]).astype(np.int64),
        image_ids=[image_id for cache in caches for image_id in cache.image_ids],
        splits=np.concatenate([cache.splits for cache in caches]),
        classes=list(classes),
        skipped=[row for cache in caches for row in cache.skipped],
        source=" + ".join(cache.source for cache in caches),
    )


def build_image_cache(
    table: ImageTable,
    cache_dir: Path,
    preprocess: PreprocessConfig,
    *,
    skip_bad: bool = False,
    progress: bool = True,
) -> CachedImages:
    """Decode and preprocess every image of `table` into `cache_dir` once; reuse it while the source is unchanged."""
    cache_dir = Path(cache_dir)
    table = _grouped_by_split(table)
    labels = _label_indices(table)
    fingerprint = _fingerprint(table, preprocess)
    cached = _load_if_current(cache_dir, fingerprint)
    if cached is None:
        cached = _build(table, labels, cache_dir, preprocess, fingerprint, skip_bad=skip_bad, progress=progress)
    if cached.skipped and not skip_bad:
        listed = "; ".join(f"{row.source}: {row.reason}" for row in cached.skipped[:5])
        raise DataError(
            f"{len(cached.skipped)} image(s) of {table.root} cannot be decoded ({listed}); "
            "re-export or remove these files, or pass --skip-bad to leave bad images out and list them"
        )
    return cached


def _grouped_by_split(table: ImageTable) -> ImageTable:
    """The table with rows grouped train, val, test (stable), so each split is one slice of the cache."""
    frame = table.frame
    if "split" not in frame.columns:
        return table
    unknown = sorted(set(frame["split"]) - set(SPLITS))
    if unknown:
        raise DataError(f"{table.root}: split values {unknown} are not among {list(SPLITS)}; split the table again")
    order = frame["split"].map({name: position for position, name in enumerate(SPLITS)})
    grouped = frame.iloc[np.argsort(order.to_numpy(), kind="stable")].reset_index(drop=True)
    return ImageTable(frame=grouped, classes=table.classes, format=table.format, root=table.root, skipped=table.skipped)


def _label_indices(table: ImageTable) -> np.ndarray:
    """Class index of every row; labels outside the class list are an error."""
    foreign = sorted(set(table.frame["label"]) - set(table.classes))
    if foreign:
        raise DataError(
            f"{table.root}: labels {foreign} are not among the classes {table.classes}; "
            "relabel or remove those images, or use a class list that includes them"
        )
    return np.asarray(table.label_indices, dtype=np.int64)


def _splits(table: ImageTable) -> list[str]:
    """Split of every row; a table that was never split is all training data."""
    if "split" in table.frame.columns:
        return [str(split) for split in table.frame["split"]]
    return ["train"] * len(table)


def _fingerprint(table: ImageTable, preprocess: PreprocessConfig) -> str:
    """sha256 over everything that decides the cached pixels and index, file sizes and times included."""
    digest = hashlib.sha256()
    header = {"version": CACHE_FORMAT_VERSION, "preprocess": preprocess.model_dump(), "classes": table.classes}
    digest.update(json.dumps(header, sort_keys=True).encode())
    frame = table.frame
    for image_id, path, label, split in zip(frame["image_id"], frame["path"], frame["label"], _splits(table)):
        try:
            status = os.stat(path)
            size, modified = status.st_size, status.st_mtime_ns
        except OSError:
            size, modified = -1, -1  # a missing file is reported by the build, not here
        digest.update(json.dumps([str(image_id), str(path), str(label), split, size, modified]).encode())
    return digest.hexdigest()


def _load_if_current(cache_dir: Path, fingerprint: str) -> CachedImages | None:
    """The cache in `cache_dir` when it was built from exactly this source and these options."""
    try:
        index = json.loads((cache_dir / INDEX_FILE).read_text())
        if index.get("fingerprint") != fingerprint:
            return None
        cached = CachedImages(
            images=np.load(cache_dir / IMAGES_FILE, mmap_mode="r"),
            labels=np.asarray(index["labels"], dtype=np.int64),
            image_ids=list(index["image_ids"]),
            splits=np.asarray(index["splits"], dtype=str),
            classes=list(index["classes"]),
            skipped=[SkippedRow(**row) for row in index["skipped"]],
            source=str(cache_dir),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing, unreadable or half-written: rebuild
    if not (len(cached.images) == len(cached.labels) == len(cached.image_ids) == len(cached.splits)):
        return None
    return cached


def _build(
    table: ImageTable,
    labels: np.ndarray,
    cache_dir: Path,
    preprocess: PreprocessConfig,
    fingerprint: str,
    *,
    skip_bad: bool,
    progress: bool,
) -> CachedImages:
    """Decode every image on a thread pool into a new cache, then swap it in atomically."""
    if len(table) == 0:
        raise DataError(f"{table.root}: no images to cache; check the data folder and its label file")
    cache_dir.mkdir(parents=True, exist_ok=True)
    size = preprocess.image_size
    paths = [str(path) for path in table.frame["path"]]
    unique = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temporary, shorter = cache_dir / f".{IMAGES_FILE}.{unique}.tmp", cache_dir / f".{IMAGES_FILE}.{unique}.short.tmp"
    kept: list[int] = []
    skipped: list[SkippedRow] = []

    def load(path: str) -> np.ndarray | DataError:
        try:
            return preprocess_image(decode_image(Path(path), draft_size=2 * size), preprocess)
        except DataError as error:
            return error

    try:
        pixels = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
        # PIL and OpenCV release the GIL while decoding and resizing, so threads scale with cores.
        with ThreadPoolExecutor(max_workers=usable_cpu_count()) as pool:
            results = show_progress(
                len(paths), f"caching {cache_dir.parent.name}/{cache_dir.name}", enabled=progress, iterable=pool.map(load, paths)
            )
            for row, result in enumerate(results):
                if isinstance(result, DataError):
                    if not skip_bad:
                        pool.shutdown(wait=False, cancel_futures=True)
                        raise result
                    skipped.append(SkippedRow(source=paths[row], reason=str(result)))
                else:
                    pixels[len(kept)] = result
                    kept.append(row)
        if not kept:
            raise DataError(
                f"none of the {len(paths)} images of {table.root} can be decoded (first: {skipped[0].reason}); "
                "check that the data folder holds the images its label file names"
            )
        pixels.flush()
        if skipped:
            with open(shorter, "wb") as handle:
                np.save(handle, pixels[: len(kept)])
            del pixels
            os.replace(shorter, temporary)
        else:
            del pixels
        row_splits = _splits(table)
        index = {
            "format_version": CACHE_FORMAT_VERSION,
            "fingerprint": fingerprint,
            "preprocess": preprocess.model_dump(),
            "classes": list(table.classes),
            "image_ids": [str(table.frame["image_id"].iloc[row]) for row in kept],
            "labels": [int(labels[row]) for row in kept],
            "splits": [row_splits[row] for row in kept],
            "skipped": [{"source": row.source, "reason": row.reason} for row in skipped],
        }
        _swap_in(cache_dir, temporary, index)
    finally:
        temporary.unlink(missing_ok=True)
        shorter.unlink(missing_ok=True)
    cached = _load_if_current(cache_dir, fingerprint)
    if cached is None:
        raise DataError(f"the image cache in {cache_dir} cannot be read back after writing; check the disk and rerun")
    return cached


def _swap_in(cache_dir: Path, temporary_images: Path, index: dict) -> None:
    """Replace the cache files so a reader never pairs a new index with old images or the reverse."""
    index_path = cache_dir / INDEX_FILE
    temporary_index = cache_dir / f".{INDEX_FILE}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        temporary_index.write_text(json.dumps(index))
        # Invalidate first: an interruption between the two renames leaves no index, so a rebuild.
        index_path.unlink(missing_ok=True)
        os.replace(temporary_images, cache_dir / IMAGES_FILE)
        os.replace(temporary_index, index_path)
    finally:
        temporary_index.unlink(missing_ok=True)
