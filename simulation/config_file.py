"""`skin-fl-sim --config RUN.toml`: a deployment's run-config file as the simulation's settings, flags on top."""

from __future__ import annotations

import argparse
from pathlib import Path

from server.run_config_file import read_run_config_values
from shared.config import FLOWER_RUN_CONFIG_KEYS, RunConfig, flower_value_to_setting
from shared.errors import ConfigError

# Run-config keys that skin-fl-sim also takes as a flag: key -> the flag's argparse dest.
# The file's value becomes that flag's default, so a flag given on the command line wins.
KEY_TO_OPTION = {
    "num-server-rounds": "rounds",
    "strategy": "strategy",
    "proximal-mu": "proximal_mu",
    "server-learning-rate": "server_lr",
    "server-momentum": "server_momentum",
    "fraction-train": "fraction_train",
    "select-model": "select_model",
    "early-stopping-patience": "early_stopping_patience",
    "batch-norm": "batch_norm",
    "prior-correction": "prior_correction",
    "head-refit-steps": "head_refit_steps",
    "refit-layers": "refit_layers",
    "model": "model",
    "pretrained": "pretrained",
    "image-size": "image_size",
    "colour-constancy": "colour_constancy",
    "clahe": "clahe",
    "batch-size": "batch_size",
    "learning-rate": "lr",
    "local-epochs": "local_epochs",
    "balance": "balance",
    "loss": "loss",
    "amp": "amp",
    "max-steps-per-epoch": "max_steps_per_epoch",
    "local-steps": "local_steps",
    "label-smoothing": "label_smoothing",
    "seed": "seed",
    "gan-rounds": "gan_rounds",
    "gan-only": "gan_only",
    "gan-generator": "gan_generator",
    "gan-image-size": "gan_image_size",
    "gan-local-steps": "gan_local_steps",
    "gan-batch-size": "gan_batch_size",
    "gan-amp": "gan_amp",
    "gan-diff-augment": "gan_diff_augment",
    "gan-grid-every": "gan_grid_every",
    "gan-augment": "gan_augment",
    "gan-target": "gan_target",
    "gan-target-ratio": "gan_target_ratio",
    "gan-feature-classifier": "gan_feature_classifier",
    "privacy-mode": "privacy",
    "privacy-target-epsilon": "target_epsilon",
    "privacy-target-delta": "target_delta",
    "privacy-noise-multiplier": "noise_multiplier",
    "privacy-max-grad-norm": "max_grad_norm",
    "privacy-poisson-sampling": "no_poisson_sampling",
    "privacy-grad-sample-mode": "grad_sample_mode",
    "privacy-trainable-stages": "trainable_stages",
    "tensorboard": "tensorboard",
    "personalise-epochs": "personalise_epochs",
}
INVERTED_FLAGS = {"privacy-poisson-sampling"}
"""Keys whose flag says the opposite (--no-poisson-sampling)."""


def apply_config_file(parser: argparse.ArgumentParser, path: Path) -> dict:
    """Make the file's values the defaults of their flags; return the nested settings of keys without a flag."""
    values = read_run_config_values(path)
    dests = {action.dest for action in parser._actions}
    defaults, without_flag = {}, {}
    for key, value in values.items():
        setting = flower_value_to_setting(key, value)
        option = KEY_TO_OPTION.get(key)
        if option is None:
            without_flag[key] = setting
            continue
        if option not in dests:
            raise ConfigError(f"skin-fl-sim has no option for run-config key {key!r} (expected --{option.replace('_', '-')})")
        defaults[option] = (not setting) if key in INVERTED_FLAGS else setting
    parser.set_defaults(**defaults)
    return without_flag


def with_file_settings(run: RunConfig, without_flag: dict, path: Path) -> RunConfig:
    """`run` with the file's settings that have no flag (weight-decay, round-timeout, ...), validated again."""
    if not without_flag:
        return run
    classes = without_flag.pop("classes", None)
    if classes is not None and list(classes) != list(run.classes):
        raise ConfigError(
            f"{path} sets classes {classes}, but the data has {run.classes}; skin-fl-sim takes the classes from "
            "the data: drop the classes key"
        )
    nested = run.model_dump()
    for key, setting in without_flag.items():
        *parents, field = FLOWER_RUN_CONFIG_KEYS[key]
        target = nested
        for part in parents:
            target = target[part]
        target[field] = setting
    try:
        return RunConfig.model_validate(nested)
    except ValueError as error:
        raise ConfigError(f"{path}: {error}") from error
