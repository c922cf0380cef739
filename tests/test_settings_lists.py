"""The settings lists agree: pyproject's run config, the Flower run-config keys, skin-fl-sim's flags, the typed settings."""

import tomllib
from pathlib import Path

from shared.config import FLOWER_RUN_CONFIG_KEYS, RunConfig, run_config_from_flower
from simulation.cli import build_parser
from simulation.config_file import KEY_TO_OPTION

ROOT = Path(__file__).resolve().parents[1]
SERVER_ONLY_KEYS = {"resume-folder"}
"""Run-config keys the ServerApp reads itself (which run folder to continue), outside the typed run settings."""


def _pyproject_run_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_declares_every_run_config_key_and_no_other():
    assert set(_pyproject_run_config()) == set(FLOWER_RUN_CONFIG_KEYS) | SERVER_ONLY_KEYS


def test_every_run_config_key_lands_in_a_typed_setting_and_pyprojects_values_are_the_defaults():
    for key, path in FLOWER_RUN_CONFIG_KEYS.items():
        model = RunConfig
        for part in path[:-1]:
            model = model.model_fields[part].annotation
        assert path[-1] in model.model_fields, f"{key} -> {'.'.join(path)} is no setting"
    values = {key: value for key, value in _pyproject_run_config().items() if key not in SERVER_ONLY_KEYS}
    assert run_config_from_flower(values).model_dump() == RunConfig().model_dump()


def test_every_simulation_flag_of_a_run_config_key_exists():
    destinations = {action.dest for action in build_parser()._actions}
    assert set(KEY_TO_OPTION) <= set(FLOWER_RUN_CONFIG_KEYS)
    assert {key: option for key, option in KEY_TO_OPTION.items() if option not in destinations} == {}
