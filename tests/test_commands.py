"""The command surface: --version on every console script, skin-fl-sim --config with a deployment's run-config keys."""

import importlib
import importlib.metadata
import tomllib
from pathlib import Path

import pytest

from shared.config import FLOWER_RUN_CONFIG_KEYS
from shared.errors import ConfigError
from simulation.cli import build_parser, parse_arguments, run_config_from_args
from simulation.config_file import KEY_TO_OPTION

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_console_script_answers_version(script, capsys):
    module_name, function = SCRIPTS[script].split(":")
    main = getattr(importlib.import_module(module_name), function)
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith(f"{script} {importlib.metadata.version('skin-fl')} (Flower {importlib.metadata.version('flwr')}, torch ")
    assert "Python 3." in printed


def test_every_flag_a_run_config_key_maps_to_exists():
    dests = {action.dest for action in build_parser()._actions}
    assert set(KEY_TO_OPTION) <= set(FLOWER_RUN_CONFIG_KEYS)
    assert set(KEY_TO_OPTION.values()) <= dests, sorted(set(KEY_TO_OPTION.values()) - dests)


def _run(tmp_path, text: str, *flags: str):
    path = tmp_path / "run.toml"
    path.write_text(text)
    args = parse_arguments(["--config", str(path), *flags])
    return run_config_from_args(args, CLASSES, 128)


def test_sim_config_file_sets_flagged_and_unflagged_keys_and_flags_win(tmp_path):
    run = _run(
        tmp_path,
        'num-server-rounds = 7\nlearning-rate = 0.01\nstrategy = "fedprox"\nweight-decay = 0.001\n'
        "round-timeout = 60.0\nearly-stopping-patience = 2\nmax-steps-per-epoch = 0\ncolour-constancy = true\n"
        'classes = "akiec,bcc,bkl,df,mel,nv,vasc"\nimage-size = 64\n',
        "--rounds", "3", "--image-size", "96",
    )
    assert run.federation.rounds == 3 and run.preprocess.image_size == 96  # flags win
    assert run.train.learning_rate == 0.01 and run.federation.strategy == "fedprox"
    assert run.train.weight_decay == 0.001 and run.federation.round_timeout_s == 60.0  # keys without a flag
    assert run.federation.early_stopping_patience == 2 and run.train.max_steps_per_epoch is None
    assert run.preprocess.colour_constancy is True
    plain = run_config_from_args(parse_arguments([]), CLASSES, 128)
    assert plain.federation.rounds != 7 and plain.train.weight_decay != 0.001


def test_sim_config_file_privacy_keys_reach_the_privacy_settings(tmp_path):
    run = _run(
        tmp_path,
        'privacy-mode = "local"\nprivacy-target-epsilon = 3.0\nprivacy-target-delta = 1e-5\nprivacy-max-grad-norm = 1.0\n'
        'privacy-poisson-sampling = false\nbalance = "none"\n',
        "--target-epsilon", "8",
    )
    assert run.privacy.mode == "local" and run.privacy.target_epsilon == 8 and run.privacy.target_delta == 1e-5
    assert run.privacy.poisson_sampling is False and run.train.balance == "none"


def test_a_budget_alone_is_a_complete_private_simulation_and_prior_correction_can_be_turned_off():
    run = run_config_from_args(parse_arguments(["--privacy", "local", "--target-epsilon", "8"]), CLASSES, 128)
    assert run.privacy.recipe == "linear-head" and run.train.balance == "none"
    assert (run.privacy.target_delta, run.privacy.max_grad_norm) == (1e-5, 20.0)
    assert run_config_from_args(parse_arguments([]), CLASSES, 128).train.balance == "sampler"
    assert run_config_from_args(parse_arguments([]), CLASSES, 128).federation.prior_correction is True
    assert run_config_from_args(parse_arguments(["--no-prior-correction"]), CLASSES, 128).federation.prior_correction is False


def test_the_deployment_example_run_config_runs_as_a_simulation():
    args = parse_arguments(["--config", str(REPO / "deploy" / "run-config.example.toml")])
    run = run_config_from_args(args, CLASSES, 128)
    example = tomllib.loads((REPO / "deploy" / "run-config.example.toml").read_text())
    assert run.federation.rounds == example["num-server-rounds"]


def test_sim_config_file_errors_name_the_fix(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run(tmp_path, "num-rounds = 3\n")
    assert "unknown run-config key(s) ['num-rounds']" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="drop the classes key"):
        _run(tmp_path, 'classes = "benign,malignant"\n')
    with pytest.raises(ConfigError, match="weight_decay"):
        _run(tmp_path, "weight-decay = -1.0\n")
