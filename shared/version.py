"""The `--version` every skin-fl command answers: its own version and those of the libraries a bug report needs."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform

DISTRIBUTION = "skin-fl"
REPORTED_LIBRARIES = (("Flower", "flwr"), ("torch", "torch"), ("timm", "timm"), ("Opacus", "opacus"))


def installed_version(distribution: str = DISTRIBUTION) -> str:
    """The installed version of a distribution (skin-fl by default), or 'not installed'."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def version_text(program: str) -> str:
    """'skin-fl-sim 0.1.0 (Flower 1.41.0, torch 2.13.0, timm 1.0.31, Opacus 1.6.0, Python 3.11.7)'."""
    libraries = ", ".join(f"{name} {installed_version(distribution)}" for name, distribution in REPORTED_LIBRARIES)
    own = installed_version(DISTRIBUTION)
    if own == "not installed":
        own = "(source tree, not installed: pip install -c constraints.txt -e .)"
    return f"{program} {own} ({libraries}, Python {platform.python_version()})"


def add_version_option(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give a command's parser `--version`, which prints `version_text` and exits."""
    parser.add_argument("--version", action="version", version=version_text(parser.prog))
    return parser
