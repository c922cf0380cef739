"""Console scripts of this environment: the site client and the coordinator start Flower's from here."""

from __future__ import annotations

import sys
from pathlib import Path
from shutil import which

from shared.errors import ConfigError


def venv_executable(name: str) -> str:
    """A console script installed next to this Python (the venv's bin), else found on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = which(name)
    if found is None:
        raise ConfigError(f"{name} is not installed; install skin-fl with 'pip install -e .' in this environment.")
    return found
