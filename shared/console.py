"""What a skin-fl command prints: the project's own lines, Flower and Ray kept quiet, colour only on a terminal."""

from __future__ import annotations

import logging
import os
import sys
import warnings

VERBOSE_ENV = "SKIN_FL_VERBOSE"
"""'1' shows Flower's own log (the -v of skin-fl-sim and skin-fl-server); child processes inherit it."""
PROJECT_LOGGERS = ("skin_fl", "client", "server", "shared", "simulation")
FLOWER_LOGGER = "flwr"
# Messages nobody running skin-fl can act on, dropped at their source even with -v.
UNACTIONABLE_FLOWER_MESSAGES = ("DEPRECATED FEATURE: The `run_simulation` function is deprecated",)
UNACTIONABLE_RAY_WARNING = r"Tip: In future versions of Ray, Ray will no longer override accelerator"


class _ProjectFormatter(logging.Formatter):
    """The message alone for INFO; 'warning: ...' / 'error: ...' above it."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno <= logging.INFO else f"{record.levelname.lower()}: {message}"


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a line is logged (a test's capture, a redirected stream)."""

    skin_fl_console = True

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


class _DropUnactionable(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(message in text for message in UNACTIONABLE_FLOWER_MESSAGES)


def is_terminal(stream=None) -> bool:
    """Whether `stream` (default stderr) is an interactive terminal, the only place colour and bars belong."""
    stream = stream or sys.stderr
    return hasattr(stream, "isatty") and stream.isatty()


def verbose_requested() -> bool:
    """Whether this process (or the command that started it) asked for Flower's own log."""
    return os.environ.get(VERBOSE_ENV) == "1"


def show_project_logs() -> None:
    """Print the project's INFO lines (round summaries, selection, calibration) on stdout as plain lines; idempotent."""
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not any(getattr(handler, "skin_fl_console", False) for handler in logger.handlers):
            handler = _StdoutHandler()
            handler.setFormatter(_ProjectFormatter("%(message)s"))
            logger.addHandler(handler)


def configure_console(verbose: bool | None = None) -> None:
    """Set up a command's output: project lines shown, Flower at ERROR unless verbose, no colour off a terminal.

    Call it after Flower is imported: Flower turns colour on when it reads FLWR_LOG_LEVEL at import.
    `verbose` None keeps what the environment says (a ServerApp started by skin-fl-server -v).
    """
    if verbose is None:
        verbose = verbose_requested()
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    level = "INFO" if verbose else "ERROR"
    # Child processes (Ray's site actors, Flower's own processes) read these when they start.
    os.environ["FLWR_LOG_LEVEL"] = level
    if not is_terminal(sys.stdout):
        os.environ["RAY_COLOR_PREFIX"] = "0"
    show_project_logs()
    flower = logging.getLogger(FLOWER_LOGGER)
    for handler in flower.handlers:
        if hasattr(handler, "colored"):  # Flower's ConsoleHandler
            handler.colored = is_terminal(getattr(handler, "stream", None))
            handler.setLevel(level)
    if not any(isinstance(existing, _DropUnactionable) for existing in flower.filters):
        flower.addFilter(_DropUnactionable())
    warnings.filterwarnings("ignore", message=UNACTIONABLE_RAY_WARNING, category=FutureWarning)
