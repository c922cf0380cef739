"""A site runs only its installed code: the coordinator's app package is compared with it file by file."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from client.app_package import (
    CHECKED_PACKAGES,
    AppPackageMismatch,
    check_app_package,
    differing_files,
    install_root,
    installed_code,
)
from client.reply_guard import site_error_code
from shared.protocol import ScreenedSiteError, site_error_reason


def _fab(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("pyproject.toml", b"[project]\nname = 'skin-fl'\n")
        archive.writestr(".info/CONTENT", b"")
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def _installed_files(root: Path) -> dict[str, bytes]:
    return {name: (root / name).read_bytes() for name in installed_code(root)}


def _tiny_installation(tmp_path: Path) -> Path:
    root = tmp_path / "site-packages"
    for name, text in {
        "client/__init__.py": "", "client/app.py": "app = 1\n", "shared/__init__.py": "", "shared/protocol.py": "KEY = 'k'\n",
        "server/__init__.py": "", "other_package/mod.py": "x = 1\n", "client/__pycache__/app.cpython-311.py": "stale",
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_an_app_package_of_exactly_the_installed_code_is_accepted():
    root = install_root()
    files = _installed_files(root)
    assert {"client/app.py", "shared/protocol.py", "server/app.py", "client/app_package.py"} <= set(files)
    assert not any("__pycache__" in name for name in files)
    check_app_package(_fab(files))
    assert differing_files(_fab(files)) == []


def test_changed_added_and_missing_files_are_each_named_and_refused(tmp_path):
    root = _tiny_installation(tmp_path)
    files = _installed_files(root)
    assert set(files) == {"client/__init__.py", "client/app.py", "shared/__init__.py", "shared/protocol.py", "server/__init__.py"}
    changed = {**files, "client/app.py": b"import os; os.system('curl evil')\n", "client/extra.py": b"x = 2\n"}
    del changed["shared/protocol.py"]
    assert differing_files(_fab(changed), root) == ["client/app.py", "client/extra.py", "shared/protocol.py"]
    with pytest.raises(AppPackageMismatch, match=r"differs from the skin-fl code installed at this site in 3 file\(s\) "
                       r"\(client/app.py, client/extra.py, shared/protocol.py\).*Install the same skin-fl version"):
        check_app_package(_fab(changed), root)
    # Files outside the site's packages (the README, tests, other tools) do not count.
    check_app_package(_fab({**files, "tests/test_x.py": b"assert 0\n", "README.md": b"hi"}), root)


def test_a_package_that_is_not_a_zip_is_refused(tmp_path):
    with pytest.raises(AppPackageMismatch, match="not a readable zip archive"):
        check_app_package(b"not a zip", _tiny_installation(tmp_path))


def test_a_refused_package_reaches_the_coordinator_as_its_own_fixed_code():
    code = site_error_code(AppPackageMismatch("differs in client/app.py"))
    assert code == "site-app-package"
    screened = ScreenedSiteError.of(site_error_reason(code, "0123456789ab"))
    assert screened.code == "site-app-package" and "app package differs" in screened.reason


def test_the_checked_packages_are_what_an_app_package_carries():
    import tomllib

    pyproject = tomllib.loads((install_root() / "pyproject.toml").read_text())
    carried = {pattern.split("/", 1)[0] for pattern in pyproject["tool"]["flwr"]["app"]["fab-include"]}
    assert carried == set(CHECKED_PACKAGES)
