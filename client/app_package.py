"""The site runs only its own installed skin-fl code: an app package from the coordinator must hold that same code."""

from __future__ import annotations

import hashlib
import io
import zipfile
from functools import lru_cache
from pathlib import Path

from shared.errors import SkinFLError

CHECKED_PACKAGES = ("client", "shared", "server")
"""The packages an app package carries (pyproject's `fab-include`) and a site's ClientApp may import."""

MAX_NAMED_FILES = 5


class AppPackageMismatch(SkinFLError):
    """The coordinator's app package holds code that differs from what this site has installed."""


def install_root() -> Path:
    """The folder that holds this installation's `client`, `shared` and `server` packages."""
    return Path(__file__).resolve().parent.parent


def _digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _is_checked(name: str) -> bool:
    return name.endswith(".py") and name.split("/", 1)[0] in CHECKED_PACKAGES and "/__pycache__/" not in name


@lru_cache(maxsize=4)
def installed_code(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every Python file of the checked packages installed under `root`."""
    return {
        path.relative_to(root).as_posix(): _digest(path.read_bytes())
        for package in CHECKED_PACKAGES
        if (root / package).is_dir()
        for path in sorted((root / package).rglob("*.py"))
        if _is_checked(path.relative_to(root).as_posix())
    }


def package_code(fab_content: bytes) -> dict[str, str]:
    """Relative path -> sha256 of every Python file of the checked packages in an app package (a FAB, a zip)."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab_content)) as archive:
            return {name: _digest(archive.read(name)) for name in archive.namelist() if _is_checked(name)}
    except zipfile.BadZipFile as error:
        raise AppPackageMismatch(f"the app package is not a readable zip archive ({error})") from error


def differing_files(fab_content: bytes, root: Path | None = None) -> list[str]:
    """The checked files that the app package and this installation do not hold identically (sorted)."""
    installed = installed_code(root or install_root())
    received = package_code(fab_content)
    return sorted(name for name in installed.keys() | received.keys() if installed.get(name) != received.get(name))


def check_app_package(fab_content: bytes, root: Path | None = None) -> None:
    """Raise AppPackageMismatch unless the app package's code is exactly this site's installed code."""
    differing = differing_files(fab_content, root)
    if differing:
        named = ", ".join(differing[:MAX_NAMED_FILES]) + (f" and {len(differing) - MAX_NAMED_FILES} more" if len(differing) > MAX_NAMED_FILES else "")
        raise AppPackageMismatch(
            f"the coordinator's app package differs from the skin-fl code installed at this site in {len(differing)} "
            f"file(s) ({named}); this site runs only its own installed code. Install the same skin-fl version at the "
            f"site and at the coordinator ('pip show skin-fl' on both), then restart skin-fl-client."
        )
