"""What the dataset readers share: CSV loading with column checks, image lookup, bad rows, the table."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from shared.data.records import TABLE_COLUMNS, ImageTable, SkippedRow
from shared.errors import DataError

SKIP_BAD_HINT = "or pass --skip-bad (skip_bad=True) to leave such rows out and list them"


def require_folder(root: Path, format_name: str, expected_layout: str) -> Path:
    """The dataset folder as an absolute path; a missing folder is an error."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"{format_name} dataset folder {root} does not exist or is not a folder; "
            f"give the folder that holds {expected_layout}"
        )
    return root.resolve()


@dataclass
class CsvRow:
    """One data row of a CSV file with its 1-based line number (the header is line 1)."""

    line: int
    values: dict[str, str]


@dataclass
class CsvFile:
    """A CSV file's path, header columns and data rows (cells stripped of surrounding spaces)."""

    path: Path
    columns: list[str]
    rows: list[CsvRow]

    def source(self, row: CsvRow) -> str:
        """How error messages and skipped-row lists name one row."""
        return f"{self.path} line {row.line}"


def read_csv_file(path: Path, required_columns: Iterable[str], *, what: str) -> CsvFile:
    """Read a CSV file after checking that it exists and has the required columns.

    `what` names the file for the fix ("the HAM10000 metadata from the Dataverse download").
    """
    required = list(required_columns)
    if not path.is_file():
        raise DataError(
            f"{path.name} not found in {path.parent}; expected {path} ({what}); "
            "put the file there or point to the folder that holds it"
        )
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path} is empty; it needs a header row naming the columns {required} ({what})")
            columns = [name.strip() for name in header]
            missing = [name for name in required if name not in columns]
            if missing:
                raise DataError(
                    f"{path} lacks column(s) {missing} (its header has {columns}); "
                    f"use the original {what}, whose header names {required}"
                )
            rows = []
            for cells in reader:
                if not any(cell.strip() for cell in cells):
                    continue
                values = {name: (cells[index].strip() if index < len(cells) else "") for index, name in enumerate(columns)}
                rows.append(CsvRow(line=reader.line_num, values=values))
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error}); save it as a UTF-8 CSV file") from error
    except csv.Error as error:
        raise DataError(f"{path}: not a readable CSV file ({error}); fix its quoting or re-export it") from error
    return CsvFile(path=path, columns=columns, rows=rows)


class ImageLocator:
    """Finds `<image id><extension>` in the first of several candidate folders that holds it.

    Each folder is listed once, so looking up tens of thousands of ids costs no file-system calls;
    names are matched case-insensitively because archives unpacked on different systems differ.
    """

    def __init__(self, root: Path, folders: Iterable[str], extension: str = ".jpg") -> None:
        self.root = root
        self.folders = list(folders)
        self.extension = extension
        self._index: dict[str, Path] = {}
        for folder in (root / name for name in self.folders):
            if not folder.is_dir():
                continue
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_file():
                        self._index.setdefault(entry.name.lower(), Path(entry.path))

    def find(self, image_id: str) -> Path | None:
        """The image file of an id, or None when no candidate folder holds it."""
        if not image_id:
            return None
        return self._index.get(f"{image_id}{self.extension}".lower())

    def missing_message(self, image_id: str) -> str:
        """What to say about an id whose image is nowhere."""
        folders = ", ".join(f"{name}/" if name else "./" for name in self.folders)
        if not image_id:
            return "missing image: the row has no image id"
        return f"missing image {image_id}{self.extension}: not in any of {folders} under {self.root}"


@dataclass
class BadRows:
    """The bad rows of one read: one error naming the first (and how many more), or skipped with skip_bad."""

    skip_bad: bool
    problems: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, source: str, problem: str, fix: str) -> None:
        """Record a row that cannot be used: where it is, what is wrong, how to fix it."""
        self.problems.append((source, problem, fix))

    def raise_unless_skipping(self) -> list[SkippedRow]:
        """Raise for the first bad row unless skipping; returns the skipped rows."""
        if self.problems and not self.skip_bad:
            source, problem, fix = self.problems[0]
            more = f" ({len(self.problems) - 1} more bad rows or files after it)" if len(self.problems) > 1 else ""
            raise DataError(f"{source}: {problem}{more}; {fix}, {SKIP_BAD_HINT}")
        return [SkippedRow(source=source, reason=problem) for source, problem, _ in self.problems]


class UnknownLabel(Exception):
    """Raised by a reader's label function; the text says what the value is and what is allowed."""


@dataclass
class LabelledRow:
    """A CSV row whose label is known and whose image exists."""

    source: str
    values: dict[str, str]
    image_id: str
    label: str
    path: Path


def labelled_image_rows(
    csv_file: CsvFile,
    *,
    id_column: str,
    label_of: Callable[[dict[str, str]], str],
    locator: ImageLocator,
    bad_rows: BadRows,
) -> list[LabelledRow]:
    """The rows of a label CSV whose label is known and whose image exists; others go to `bad_rows`."""
    usable = []
    for row in csv_file.rows:
        source = csv_file.source(row)
        image_id = row.values[id_column]
        try:
            label = label_of(row.values)
        except UnknownLabel as problem:
            bad_rows.add(source, f"unknown label {problem}", f"correct the label in {csv_file.path.name} or remove the row")
            continue
        path = locator.find(image_id)
        if path is None:
            bad_rows.add(source, locator.missing_message(image_id), "put the image in one of those folders or remove the row")
            continue
        usable.append(LabelledRow(source=source, values=row.values, image_id=image_id, label=label, path=path))
    return usable


@dataclass
class TableEntry:
    """One image of the table being built, with where it came from for duplicate messages."""

    source: str
    image_id: str
    path: Path
    label: str
    group: str
    site: str


def build_table(
    entries: list[TableEntry],
    *,
    classes: list[str],
    format_name: str,
    root: Path,
    skipped: list[SkippedRow],
    empty_fix: str,
) -> ImageTable:
    """The `ImageTable` of checked entries; duplicate image ids and an empty dataset are errors."""
    first: dict[str, TableEntry] = {}
    for entry in entries:
        # Image files are found without regard to case, so ids differing only in case name one file.
        key = entry.image_id.casefold()
        if key in first:
            earlier = first[key]
            if earlier.image_id == entry.image_id:
                raise DataError(
                    f"duplicate image id {entry.image_id!r}: {earlier.source} and {entry.source}; keep one row (or file) per image"
                )
            raise DataError(
                f"image ids {earlier.image_id!r} ({earlier.source}) and {entry.image_id!r} ({entry.source}) differ only in "
                "case, so they name the same image and it could land in two splits; keep one row (or file) per image "
                "(remove or rename one of them)"
            )
        first[key] = entry
    if not entries:
        left_out = f" ({len(skipped)} bad rows or files were skipped)" if skipped else ""
        raise DataError(f"empty dataset: no usable images in {root}{left_out}; {empty_fix}")
    frame = pd.DataFrame(
        {
            "image_id": [entry.image_id for entry in entries],
            "path": [str(entry.path) for entry in entries],
            "label": [entry.label for entry in entries],
            "group": [entry.group for entry in entries],
            "site": [entry.site for entry in entries],
        },
        columns=list(TABLE_COLUMNS),
    )
    return ImageTable(frame=frame, classes=list(classes), format=format_name, root=root, skipped=list(skipped))


def read_labelled_csv_table(
    root: Path,
    csv_file: CsvFile,
    *,
    id_column: str,
    label_of: Callable[[dict[str, str]], str],
    image_folders: Iterable[str],
    group_and_site_of: Callable[[LabelledRow], tuple[str, str]],
    classes: list[str],
    format_name: str,
    skip_bad: bool,
) -> ImageTable:
    """The table of a reader whose labels come from one CSV: label, image lookup, bad rows, grouping."""
    bad_rows = BadRows(skip_bad)
    rows = labelled_image_rows(
        csv_file, id_column=id_column, label_of=label_of, locator=ImageLocator(root, image_folders), bad_rows=bad_rows
    )
    skipped = bad_rows.raise_unless_skipping()
    entries = []
    for row in rows:
        group, site = group_and_site_of(row)
        entries.append(
            TableEntry(
                source=row.source, image_id=row.image_id, path=row.path, label=row.label, group=group or row.image_id, site=site
            )
        )
    return build_table(
        entries,
        classes=classes,
        format_name=format_name,
        root=root,
        skipped=skipped,
        empty_fix=f"{csv_file.path.name} needs at least one row whose image exists",
    )
