"""Clinician feedback as training data: the feedback store's format, its reader, and the cases a site trains on."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from shared.config import PreprocessConfig
from shared.data.cache import CachedImages, build_image_cache
from shared.data.records import TABLE_COLUMNS, ImageTable, SkippedRow
from shared.errors import DataError

SCHEMA_VERSION = 1
"""`PRAGMA user_version` of a feedback store; bump when the `cases` table changes."""

CASES_TABLE = "cases"
STATUS_PENDING = "pending"
STATUS_CONFIRMED = "confirmed"
STATUS_CORRECTED = "corrected"
CASE_STATUSES = (STATUS_PENDING, STATUS_CONFIRMED, STATUS_CORRECTED)
REVIEWED_STATUSES = (STATUS_CONFIRMED, STATUS_CORRECTED)
"""Cases a clinician has labelled; only these become training data."""

FEEDBACK_ID_PREFIX = "feedback/"
"""Image ids of feedback cases start with this, so they never clash with a dataset's ids and can be counted."""

FEEDBACK_FORMAT = "feedback"


def open_feedback_database(path: Path, *, create: bool = False) -> sqlite3.Connection:
    """A connection to a feedback store, checking its schema version; `create` makes a missing file."""
    path = Path(path)
    if not create and not path.is_file():
        raise DataError(
            f"feedback store {path} does not exist; give the cases.sqlite that skin-fl-web writes "
            "(by default in its --data-dir)"
        )
    try:
        connection = sqlite3.connect(path, timeout=30)
        version = connection.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as error:
        raise DataError(f"{path} is not a readable feedback store ({error}); give the cases.sqlite that skin-fl-web writes") from error
    if version not in (0, SCHEMA_VERSION) or (version == 0 and not create):
        connection.close()
        raise DataError(
            f"{path} is a feedback store of schema version {version}, this skin-fl reads version {SCHEMA_VERSION}; "
            "use the skin-fl release that wrote it, or give the cases.sqlite that skin-fl-web writes"
        )
    connection.row_factory = sqlite3.Row
    return connection


def read_feedback(store_path: Path, classes: Sequence[str], *, skip_bad: bool = False) -> ImageTable:
    """The confirmed and corrected cases of a feedback store as an `ImageTable` (possibly empty).

    The label is the clinician's (confirmed or corrected), the group is the case id, and image
    paths are resolved against the store's folder, where skin-fl-web records them relative to.
    A case whose label is not in `classes` or whose image is gone is an error, or is left out
    and listed in `skipped` with `skip_bad`.
    """
    store_path = Path(store_path).expanduser().resolve()
    placeholders = ",".join("?" for _ in REVIEWED_STATUSES)
    with closing(open_feedback_database(store_path)) as connection:
        rows = connection.execute(
            f"SELECT case_id, image_path, label FROM {CASES_TABLE} WHERE status IN ({placeholders}) ORDER BY rowid",
            REVIEWED_STATUSES,
        ).fetchall()
    known = set(classes)
    entries, skipped = [], []
    for row in rows:
        source = f"{store_path} case {row['case_id']}"
        path = store_path.parent / row["image_path"]
        if row["label"] not in known:
            problem = f"label {row['label']!r} is not among the run's classes {list(classes)}"
        elif not path.is_file():
            problem = f"its image {path} is missing"
        else:
            entries.append((f"{FEEDBACK_ID_PREFIX}{row['case_id']}", str(path), row["label"], row["case_id"], ""))
            continue
        if not skip_bad:
            raise DataError(
                f"{source}: {problem}; start the run with a class list that includes it, restore the image, "
                "or pass skip-bad to leave such cases out and list them"
            )
        skipped.append(SkippedRow(source=source, reason=problem))
    frame = pd.DataFrame(entries, columns=list(TABLE_COLUMNS))
    return ImageTable(frame=frame, classes=list(classes), format=FEEDBACK_FORMAT, root=store_path.parent, skipped=skipped)


DUPLICATE_MEAN_ABS_DIFFERENCE = 4.0
"""Two images whose 16x16 thumbnails of the cached pixels differ by at most this on average (0-255
scale) are the same picture: an exact re-upload gives 0, a JPEG re-export about 1-2, while different
lesions differ by tens."""
THUMBNAIL_SIDE = 16


@dataclass
class FeedbackImages:
    """The feedback cases a site trains on this run, and how many were left out and why."""

    images: CachedImages | None
    """Cached training images of the used cases (None when there are none)."""
    used: int
    held_out_duplicates: int
    """Cases whose image is already in the site's validation or test split, so never trained on."""
    skipped: list[SkippedRow] = field(default_factory=list)


def _thumbnails(images: np.ndarray, chunk: int = 512) -> np.ndarray:
    """[N, 16*16*3] float32 thumbnails of uint8 [N, S, S, 3] images, read in chunks (memory maps stay on disk)."""
    rows = []
    for start in range(0, len(images), chunk):
        for image in np.asarray(images[start : start + chunk]):
            rows.append(cv2.resize(image, (THUMBNAIL_SIDE, THUMBNAIL_SIDE), interpolation=cv2.INTER_AREA).reshape(-1))
    return np.asarray(rows, dtype=np.float32).reshape(len(images), THUMBNAIL_SIDE * THUMBNAIL_SIDE * 3)


def held_out_duplicates(candidates: np.ndarray, held_out: np.ndarray) -> np.ndarray:
    """Boolean mask of `candidates` (uint8 [N, S, S, 3]) whose picture is among `held_out` (the same size)."""
    if len(candidates) == 0 or len(held_out) == 0:
        return np.zeros(len(candidates), dtype=bool)
    candidate_thumbnails, held_out_thumbnails = _thumbnails(candidates), _thumbnails(held_out)
    return np.array(
        [np.abs(held_out_thumbnails - row).mean(axis=1).min() <= DUPLICATE_MEAN_ABS_DIFFERENCE for row in candidate_thumbnails]
    )


def prepare_feedback_images(
    store_path: Path,
    *,
    site: str,
    site_images: CachedImages,
    preprocess: PreprocessConfig,
    cache_root: Path,
    skip_bad: bool = False,
) -> FeedbackImages:
    """The site's confirmed and corrected cases as extra training images, cached like the site's own.

    Feedback only ever joins the training split, so no case reaches validation or test; a case
    whose image is already in the site's validation or test split is left out rather than
    duplicated into training (it would leak the held-out image into training).
    """
    from shared.site_data import site_cache_dir

    table = read_feedback(store_path, site_images.classes, skip_bad=skip_bad)
    if len(table) == 0:
        return FeedbackImages(images=None, used=0, held_out_duplicates=0, skipped=list(table.skipped))
    cached = build_image_cache(
        table, site_cache_dir(cache_root, f"{site}-feedback", preprocess), preprocess, skip_bad=skip_bad, progress=False
    )
    held_out = [site_images.select(split).images for split in ("val", "test")]
    held_out = [images for images in held_out if len(images)]
    duplicate = np.zeros(len(cached), dtype=bool)
    for images in held_out:
        duplicate |= held_out_duplicates(cached.images, images)
    keep = np.flatnonzero(~duplicate)
    kept = None
    if len(keep):
        kept = CachedImages(
            images=np.asarray(cached.images[keep]),
            labels=cached.labels[keep],
            image_ids=[cached.image_ids[row] for row in keep],
            splits=np.asarray(["train"] * len(keep)),
            classes=list(cached.classes),
            skipped=list(cached.skipped),
            source=f"{store_path} (feedback)",
        )
    return FeedbackImages(
        images=kept, used=int(len(keep)), held_out_duplicates=int(duplicate.sum()), skipped=list(table.skipped) + list(cached.skipped)
    )


def feedback_summary(feedback: FeedbackImages | None) -> dict:
    """What a site report says about feedback: cases trained on, held-out duplicates left out, bad cases skipped."""
    if feedback is None:
        return {"feedback_enabled": False, "feedback_cases_used": 0, "feedback_held_out_duplicates": 0, "feedback_cases_skipped": 0}
    return {
        "feedback_enabled": True,
        "feedback_cases_used": feedback.used,
        "feedback_held_out_duplicates": feedback.held_out_duplicates,
        "feedback_cases_skipped": len(feedback.skipped),
    }
