"""The in-memory table of labelled images that every reader returns and every later step uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

TABLE_COLUMNS = ("image_id", "path", "label", "group", "site")
"""Columns of `ImageTable.frame`: `group` is the lesion (or patient) id that splits keep
together, `site` the source site named by the data (empty string when the data names none)."""

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SkippedRow:
    """One input row or file that a reader left out because `skip_bad` was asked for."""

    source: str
    reason: str


@dataclass
class ImageTable:
    """Labelled images of one dataset (or one site of it) with their class list.

    `frame` has the columns in `TABLE_COLUMNS` (plus `split` once split); `classes` is the
    ordered class list, which fixes label indices and travels with every saved model.
    """

    frame: pd.DataFrame
    classes: list[str]
    format: str
    root: Path
    skipped: list[SkippedRow] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def label_indices(self) -> list[int]:
        """Integer label of every row, in `classes` order."""
        index_of = {name: index for index, name in enumerate(self.classes)}
        return [index_of[label] for label in self.frame["label"]]

    def subset(self, mask) -> ImageTable:
        """A table with the rows selected by a boolean mask, same classes and source."""
        return ImageTable(
            frame=self.frame[mask].reset_index(drop=True),
            classes=list(self.classes),
            format=self.format,
            root=self.root,
            skipped=list(self.skipped),
        )

    def class_counts(self) -> dict[str, int]:
        """Number of images of every class (zero for absent classes), in class order."""
        counts = self.frame["label"].value_counts()
        return {name: int(counts.get(name, 0)) for name in self.classes}
