"""A coordinator's run-config TOML file: flat kebab-case keys, checked before a run is submitted."""

from __future__ import annotations

import tomllib
from pathlib import Path

from shared.config import FLOWER_RUN_CONFIG_KEYS, RunConfig, run_config_from_flower
from shared.errors import ConfigError

RESUME_KEY = "resume-folder"
"""Run-config key naming the run folder a resumed run continues; the ServerApp takes it out first."""


def app_directory() -> Path:
    """The Flower app directory of this installation: the folder with pyproject's [tool.flwr.app]."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "tool" not in (config := tomllib.loads(pyproject.read_text(encoding="utf-8"))) or (
        "app" not in config["tool"].get("flwr", {})
    ):
        raise ConfigError(
            f"{root} has no pyproject.toml with [tool.flwr.app]; install skin-fl from its source folder "
            "('pip install -e .' in the cloned repository) so the server can submit the app."
        )
    return root


def app_default_config(app_dir: Path) -> dict:
    """The app's run-config defaults ([tool.flwr.app.config] of its pyproject.toml)."""
    config = tomllib.loads((app_dir / "pyproject.toml").read_text(encoding="utf-8"))
    return dict(config["tool"]["flwr"]["app"].get("config", {}))


def read_run_config_values(path: Path) -> dict:
    """The flat kebab-case settings of a run-config file, each key checked against the known run-config keys."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"run-config file {path} does not exist; start from deploy/run-config.example.toml.")
    try:
        overrides = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is not valid TOML ({error}); see deploy/run-config.example.toml for the format.") from error
    tables = sorted(key for key, value in overrides.items() if isinstance(value, dict))
    if tables:
        raise ConfigError(
            f"{path} has tables {tables}; a run-config file holds flat kebab-case keys only, "
            "e.g. num-server-rounds = 10 (see deploy/run-config.example.toml)."
        )
    if RESUME_KEY in overrides:
        raise ConfigError(
            f"{path} sets {RESUME_KEY}; resume with 'skin-fl-server submit FILE --resume RUN_FOLDER' "
            "(or skin-fl-sim --resume RUN_FOLDER) instead."
        )
    unknown = sorted(set(overrides) - set(FLOWER_RUN_CONFIG_KEYS))
    if unknown:
        raise ConfigError(
            f"{path}: unknown run-config key(s) {unknown}; known keys are {sorted(FLOWER_RUN_CONFIG_KEYS)}."
        )
    return overrides


def read_run_config_file(path: Path, app_dir: Path) -> tuple[dict, RunConfig]:
    """The file's overrides and the validated RunConfig they give with the app defaults."""
    path = Path(path).expanduser()
    overrides = read_run_config_values(path)
    defaults = app_default_config(app_dir)
    defaults.pop(RESUME_KEY, None)  # not a run setting: the ServerApp takes it out before reading the rest
    not_in_app = sorted(set(overrides) - set(defaults))
    if not_in_app:
        raise ConfigError(
            f"{path}: key(s) {not_in_app} are skin-fl settings but have no default in [tool.flwr.app.config] of "
            f"{app_dir / 'pyproject.toml'}, and Flower accepts only keys the app declares; add a default line "
            "for each there (0 means off for numbers), or leave them out."
        )
    # As the ServerApp does: the resume key steers the run, it is not a training setting.
    settings = {key: value for key, value in {**defaults, **overrides}.items() if key != RESUME_KEY}
    return overrides, run_config_from_flower(settings)


def write_run_config_file(path: Path, values: dict) -> Path:
    """Write flat run-config values as TOML (strings, booleans, integers, floats)."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    raise ConfigError(f"run-config value {value!r} is not a string, boolean or number; Flower run configs hold only those.")
