"""The site's SQLite feedback store: every classified case, its prediction, and the clinician's label."""

from __future__ import annotations

import csv
import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from shared.data.feedback import (
    CASE_STATUSES,
    CASES_TABLE,
    SCHEMA_VERSION,
    STATUS_CONFIRMED,
    STATUS_CORRECTED,
    STATUS_PENDING,
    open_feedback_database,
)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {CASES_TABLE} (
    case_id TEXT PRIMARY KEY,
    image_path TEXT NOT NULL,
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,
    model_version TEXT NOT NULL,
    predicted_label TEXT NOT NULL,
    probabilities TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ({", ".join(repr(status) for status in CASE_STATUSES)})),
    label TEXT,
    note TEXT,
    reviewed_at TEXT,
    reviewed_by TEXT
)
"""

CSV_COLUMNS = (
    "case_id", "created_at", "created_by", "model_version", "predicted_label", "status", "label",
    "note", "reviewed_at", "reviewed_by", "image_path",
)
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r", "\n")
"""A text cell starting with one of these (after spaces) is run as a formula by spreadsheets."""


def utc_now() -> str:
    """The current time as ISO 8601 UTC text, to the millisecond."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class UnknownCase(LookupError):
    """No case with this id is in the store."""


@dataclass
class CaseRecord:
    """One classified image: where it is, what the model said, and what the clinician said."""

    case_id: str
    image_path: str
    created_at: str
    created_by: str
    model_version: str
    predicted_label: str
    probabilities: dict[str, float]
    status: str = STATUS_PENDING
    label: str | None = None
    note: str | None = None
    reviewed_at: str | None = None
    reviewed_by: str | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> CaseRecord:
        """A record from a `cases` row."""
        values = dict(row)
        values["probabilities"] = json.loads(values["probabilities"])
        return cls(**values)

    def as_row(self) -> dict:
        """The record's column values as stored."""
        return {
            "case_id": self.case_id,
            "image_path": self.image_path,
            "created_at": self.created_at,
            "created_by": self.created_by,
            "model_version": self.model_version,
            "predicted_label": self.predicted_label,
            "probabilities": json.dumps(self.probabilities),
            "status": self.status,
            "label": self.label,
            "note": self.note,
            "reviewed_at": self.reviewed_at,
            "reviewed_by": self.reviewed_by,
        }


class FeedbackStore:
    """Cases in one SQLite file; image paths are kept relative to the file's folder so the folder can move."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).expanduser().resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            # Patients' cases: readable by the service account only (SQLite gives its WAL files the same mode).
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        with self._connection() as connection:
            # WAL lets the federated client read the store while the web app writes to it.
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(_SCHEMA)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        with closing(open_feedback_database(self.path, create=True)) as connection, connection:
            yield connection

    def relative_image_path(self, image: Path) -> str:
        """How a case records its image file: relative to the store's folder."""
        return os.path.relpath(Path(image).resolve(), self.path.parent)

    def image_file(self, record: CaseRecord) -> Path:
        """The absolute path of a case's image."""
        return self.path.parent / record.image_path

    def add_cases(self, records: list[CaseRecord]) -> None:
        """Insert new (pending) cases, all or none."""
        with self._connection() as connection:
            connection.executemany(
                f"INSERT INTO {CASES_TABLE} VALUES (:case_id, :image_path, :created_at, :created_by, :model_version, "
                ":predicted_label, :probabilities, :status, :label, :note, :reviewed_at, :reviewed_by)",
                [record.as_row() for record in records],
            )

    def get(self, case_id: str) -> CaseRecord:
        """The case with this id; `UnknownCase` when there is none."""
        with self._connection() as connection:
            row = connection.execute(f"SELECT * FROM {CASES_TABLE} WHERE case_id = ?", (case_id,)).fetchone()
        if row is None:
            raise UnknownCase(case_id)
        return CaseRecord.from_row(row)

    def record_feedback(self, case_id: str, *, label: str, note: str | None, user: str) -> CaseRecord:
        """Store the clinician's label: confirmed when it is the predicted class, corrected otherwise."""
        with self._connection() as connection:
            row = connection.execute(f"SELECT predicted_label FROM {CASES_TABLE} WHERE case_id = ?", (case_id,)).fetchone()
            if row is None:
                raise UnknownCase(case_id)
            status = STATUS_CONFIRMED if label == row["predicted_label"] else STATUS_CORRECTED
            connection.execute(
                f"UPDATE {CASES_TABLE} SET status = ?, label = ?, note = ?, reviewed_at = ?, reviewed_by = ? WHERE case_id = ?",
                (status, label, note or None, utc_now(), user, case_id),
            )
        return self.get(case_id)

    def list_cases(self, *, status: str | None = None, limit: int | None = None) -> list[CaseRecord]:
        """Cases newest first, optionally of one status and at most `limit` of them."""
        query, parameters = f"SELECT * FROM {CASES_TABLE}", []
        if status is not None:
            query += " WHERE status = ?"
            parameters.append(status)
        query += " ORDER BY rowid DESC"
        if limit is not None:
            query += " LIMIT ?"
            parameters.append(int(limit))
        with self._connection() as connection:
            return [CaseRecord.from_row(row) for row in connection.execute(query, parameters)]

    def write_csv(self, handle: TextIO) -> int:
        """Write every case as CSV (one probability column per class) oldest first; returns the number of cases."""
        records = list(reversed(self.list_cases()))
        classes = list(dict.fromkeys(name for record in records for name in record.probabilities))
        writer = csv.writer(handle)
        writer.writerow([spreadsheet_safe(name) for name in [*CSV_COLUMNS, *(f"probability_{name}" for name in classes)]])
        for record in records:
            row = record.as_row()
            # Every text cell is neutralised: notes and user names are typed by people, and model
            # versions and labels come from files that people name.
            cells = [spreadsheet_safe(row[name]) for name in CSV_COLUMNS]
            writer.writerow(cells + [_format_probability(record.probabilities.get(name)) for name in classes])
        return len(records)

    def counts(self) -> dict[str, int]:
        """Number of cases of every status."""
        with self._connection() as connection:
            found = dict(connection.execute(f"SELECT status, COUNT(*) FROM {CASES_TABLE} GROUP BY status").fetchall())
        return {status: int(found.get(status, 0)) for status in CASE_STATUSES}


def spreadsheet_safe(text: str | None) -> str | None:
    """`text` with a leading apostrophe when a spreadsheet would otherwise read it as a formula (CSV injection)."""
    if text and (text[0] in FORMULA_TRIGGERS or text.lstrip(" ")[:1] in FORMULA_TRIGGERS):
        return "'" + text
    return text


def _format_probability(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"

