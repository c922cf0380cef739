"""The tree passes the project's lint rules (pyproject's [tool.ruff]: pyflakes, pycodestyle, import order, bugbear)."""

import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing_in_the_tree():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPOSITORY, capture_output=True, text=True)
    assert result.returncode == 0, f"ruff check found problems (fix them, or run 'ruff check --fix .'):\n{result.stdout}{result.stderr}"
