"""Progress of long phases: a tqdm bar on a terminal, a plain line every few seconds in a log file."""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

from shared.console import is_terminal

INTERVAL_ENV = "SKIN_FL_PROGRESS_SECONDS"
DEFAULT_INTERVAL_S = 30.0


def progress_interval() -> float:
    """Seconds between two progress lines when the output is not a terminal (SKIN_FL_PROGRESS_SECONDS, default 30)."""
    text = os.environ.get(INTERVAL_ENV, "")
    try:
        return float(text) if text else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S


class LogProgress:
    """tqdm's update / set_postfix / close for a log: a line every `interval` seconds, and a last one if any was written."""

    def __init__(self, total: int | None, description: str, stream=None, interval: float | None = None, iterable=None):
        self.total, self.description, self.iterable = total, description, iterable
        self.stream = stream or sys.stderr
        self.interval = progress_interval() if interval is None else interval
        self.done, self.postfix, self.lines = 0, "", 0
        self.started = self.last_line = time.monotonic()

    def update(self, count: int = 1) -> None:
        """Count finished items; write a line when the interval has passed."""
        self.done += count
        now = time.monotonic()
        if now - self.last_line >= self.interval:
            self.last_line = now
            self._write(now)

    def set_postfix(self, **values) -> None:
        """Figures shown after the count (loss, learning rate)."""
        self.postfix = ", ".join(f"{key} {value}" for key, value in values.items())

    def _write(self, now: float, finished: bool = False) -> None:
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        percent = f" ({100 * self.done / self.total:.0f} %)" if self.total else ""
        state = "done" if finished else "at"
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.description}: {state} {count}{percent}{extra}, {now - self.started:.0f} s", file=self.stream, flush=True)
        self.lines += 1

    def close(self) -> None:
        """A closing line, only when the phase was long enough to write one before."""
        if self.lines:
            self._write(time.monotonic(), finished=True)

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Silent:
    def update(self, count: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress(total: int | None, description: str, *, enabled: bool = True, iterable=None, stream=None):
    """A progress reporter for a long phase: tqdm on a terminal, LogProgress lines otherwise, nothing when disabled.

    With `iterable` it is iterated over (each item counts one); without, call `update` and use it as a context.
    """
    stream = stream or sys.stderr
    if not enabled:
        return iterable if iterable is not None else _Silent()
    if is_terminal(stream):
        return tqdm(iterable, total=total, desc=description, leave=False, file=stream)
    return LogProgress(total, description, stream, iterable=iterable)
