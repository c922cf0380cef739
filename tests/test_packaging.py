"""The install is reproducible: pyproject's requirements are pinned by constraints.txt, every imported module is declared."""

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from shared.extras import EXTRA_MODULES

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
PACKAGES = tuple(pattern.rstrip("*") for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"])
"""The project's own top-level packages, as pyproject installs them."""


def constraint_versions() -> dict[str, Version]:
    """Package name -> exact version in constraints.txt (every line is `name==version`)."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, separator, version = line.partition("==")
            assert separator and version, f"constraints.txt: {line!r} is not name==version"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def requirements(extra: str | None = None) -> list[Requirement]:
    """The core requirements, or one extra's, with skin-fl's own extras expanded."""
    found = []
    for text in PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]:
        requirement = Requirement(text)
        if canonicalize_name(requirement.name) == "skin-fl":
            for inner in sorted(requirement.extras):
                found += requirements(inner)
        else:
            found.append(requirement)
    return found


def distributions_of(requirement_list: list[Requirement]) -> set[str]:
    """The distributions the requirements name, plus those their own extras pull (e.g. flwr[simulation] -> ray)."""
    names = set()
    for requirement in requirement_list:
        names.add(canonicalize_name(requirement.name))
        for extra in requirement.extras:
            for text in importlib.metadata.requires(requirement.name) or []:
                inner = Requirement(text)
                if inner.marker is not None and inner.marker.evaluate({"extra": extra}):
                    names.add(canonicalize_name(inner.name))
    return names


def third_party_imports(folder: str) -> set[str]:
    """Top-level modules imported anywhere under `folder` that are neither standard library nor the project's own."""
    local = set(PACKAGES) | {path.stem for path in (REPO / "tests").glob("*.py")}
    modules = set()
    for path in (REPO / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            modules |= {name.split(".")[0] for name in names}
    return {module for module in modules if module not in sys.stdlib_module_names and module not in local}


def test_every_requirement_is_pinned_by_the_constraints_file_inside_its_range():
    pins = constraint_versions()
    everything = requirements() + [item for extra in PROJECT["optional-dependencies"] for item in requirements(extra)]
    for requirement in everything:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in constraints.txt; add {requirement.name}==<tested version>"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject's {requirement}"
        )
        assert requirement.specifier, f"{requirement.name} has no version range in pyproject.toml"
        assert any(spec.operator in ("<", "<=", "==") for spec in requirement.specifier), (
            f"{requirement} has no upper bound; bound it just above the tested {pins[name]}"
        )


def test_every_imported_third_party_module_is_declared():
    module_owners = importlib.metadata.packages_distributions()
    core = distributions_of(requirements())
    optional = {extra: distributions_of(requirements(extra)) for extra in PROJECT["optional-dependencies"]}
    for folder in PACKAGES + ("tests",):
        declared = core | (optional["test"] if folder == "tests" else set().union(*optional.values()))
        for module in sorted(third_party_imports(folder)):
            owners = {canonicalize_name(owner) for owner in module_owners.get(module, [])}
            assert owners, f"{folder}/ imports {module}, which no installed distribution provides"
            assert owners & declared, f"{folder}/ imports {module} ({', '.join(sorted(owners))}), not declared in pyproject.toml"
    # The modules require_extra checks belong to the extra it names.
    for extra, modules in EXTRA_MODULES.items():
        for module in modules:
            owners = {canonicalize_name(owner) for owner in module_owners.get(module, [])}
            assert owners & optional[extra], f"shared/extras.py lists {module} under '{extra}', which does not declare it"
            assert not owners & core, f"{module} is a core dependency; it should not be listed as the '{extra}' extra"


def test_the_installed_packages_are_the_tested_versions():
    pins = constraint_versions()
    everything = requirements("test") + requirements()
    for name in sorted({canonicalize_name(requirement.name) for requirement in everything}):
        installed = Version(importlib.metadata.version(name))
        assert Version(installed.public) == pins[name], (
            f"{name} {installed} is installed but CI tests {pins[name]}; reinstall with pip install -c constraints.txt -e '.[test]'"
        )


def test_every_install_command_uses_the_constraints_file():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^python3 -m venv .*$", readme, flags=re.MULTILINE)
    assert len(commands) == 2 and commands[0].endswith("skin-fl-sim") and commands[1].endswith("python -m pytest")
    assert commands[1] in (REPO / ".ci" / "run").read_text(), ".ci/run must run README's test command verbatim"
    docker_installs = [
        line for name in ("server", "site")
        for line in (REPO / "deploy" / "docker" / f"{name}.Dockerfile").read_text().splitlines()
        if line.startswith("RUN pip install")
    ]
    assert len(docker_installs) == 4
    for command in commands:
        steps = [step for step in command.split("&&") if "pip install" in step]
        assert len(steps) == 2 and all("-c constraints.txt" in step for step in steps), command
    for line in docker_installs:
        assert "-c constraints.txt" in line, line
    assert (REPO / "LICENSE").read_text().split()[:3] == ["Apache", "License", "Version"]
    assert PROJECT["license"]["text"] == "Apache-2.0"


def test_a_site_that_only_trains_runs_without_the_web_onnx_or_simulation_extras(tmp_path):
    blocked = sorted({module for modules in EXTRA_MODULES.values() for module in modules})
    script = f"""
import sys
for module in {blocked!r}:
    sys.modules[module] = None  # as if not installed: import fails, find_spec returns None
import client.app, client.cli, server.app, coordinator.cli, shared.local_training  # noqa: E401
from client.web_cli import main as web_main
from simulation.cli import main as sim_main
print("web", web_main(["serve", "--data-dir", {str(tmp_path)!r}]))
print("sim", sim_main(["--runs-dir", {str(tmp_path)!r}]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "web 2" in result.stdout and "sim 2" in result.stdout
    assert "skin-fl-web serve needs the 'web' extra" in result.stderr and "-e '.[web]'" in result.stderr
    assert "needs the 'simulation' extra (ray not installed)" in result.stderr
