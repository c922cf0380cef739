"""Crash-safe file writes: write beside the target, flush it to disk, rename it over the target, flush the folder."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename or a new file in it) to disk, so they survive a power loss."""
    descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_file(path: Path) -> None:
    """Flush a written file's contents to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def replaced_atomically(path: Path, mode: int | None = None) -> Iterator[Path]:
    """A temporary path beside `path` to write to; on success it is flushed and renamed over `path`.

    A reader sees the old file or the whole new one, and after a power loss the disk holds one of
    them too (the file and its folder are flushed). `mode` creates the temporary file with those
    permissions before anything is written to it (for owner-only files). On an error the
    temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if mode is not None:
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode))
        os.chmod(temporary, mode)
    try:
        yield temporary
        fsync_file(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def write_bytes_atomically(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write `data` to `path` crash-safely (see `replaced_atomically`)."""
    with replaced_atomically(path, mode) as temporary:
        with open(temporary, "r+b" if mode is not None else "wb") as handle:
            handle.write(data)
            handle.truncate()


def write_text_atomically(path: Path, text: str, mode: int | None = None) -> None:
    """Write UTF-8 `text` to `path` crash-safely."""
    write_bytes_atomically(path, text.encode("utf-8"), mode)


def write_json_atomically(path: Path, payload, *, mode: int | None = None, allow_nan: bool = False) -> None:
    """Write `payload` as indented JSON to `path` crash-safely."""
    write_text_atomically(path, json.dumps(payload, indent=2, allow_nan=allow_nan) + "\n", mode)
