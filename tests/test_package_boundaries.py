"""Client and server meet only through the shared protocol: neither package imports the other, nor the coordinator's operations."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imported_packages(path: Path) -> set[str]:
    packages = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            packages.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            packages.add(node.module.split(".")[0])
    return packages


@pytest.mark.parametrize(
    ("package", "other"),
    [
        ("client", "server"), ("server", "client"), ("shared", "client"), ("shared", "server"),
        # The ServerApp and the sites run without the coordinator's operations (credentials, processes, proxy).
        ("client", "coordinator"), ("server", "coordinator"), ("shared", "coordinator"),
    ],
)
def test_a_package_never_imports_the_other_side(package, other):
    offenders = sorted(
        str(path.relative_to(ROOT)) for path in (ROOT / package).rglob("*.py") if other in _imported_packages(path)
    )
    assert offenders == [], f"{package} modules importing {other}: {offenders}; move what both need into shared/"
