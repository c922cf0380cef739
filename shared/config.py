"""Typed, validated settings shared by the site trainer, the server and the simulation."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from shared.errors import ConfigError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DATA_FORMATS = ("ham10000", "isic2019", "isic2020", "folder", "demo")
DataFormat = Literal["ham10000", "isic2019", "isic2020", "folder", "demo"]
DEFAULT_MODEL = "tf_efficientnet_lite0"


class StrictModel(BaseModel):
    """Base for settings: unknown keys are an error, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class PreprocessConfig(StrictModel):
    """How images are decoded into the per-site cache (deterministic, done once)."""

    image_size: int = Field(128, ge=32, le=1024, description="Square side in pixels after resize and centre crop.")
    colour_constancy: bool = Field(False, description="Shades-of-Gray colour constancy (Finlayson, p=6).")
    clahe: bool = Field(False, description="CLAHE on the lightness channel.")


class ModelConfig(StrictModel):
    """Which classifier to build and how to initialise it."""

    name: str = Field(DEFAULT_MODEL, description="Any timm architecture name.")
    pretrained: str = Field(
        "default",
        description="'default' (packaged ImageNet weights for the default model), "
        "'none' (random init), or a path to a local timm weights file.",
    )

    @field_validator("pretrained")
    @classmethod
    def _pretrained_is_keyword_or_file(cls, value: str) -> str:
        if value in ("default", "none"):
            return value
        if not Path(value).expanduser().is_file():
            raise ValueError(
                f"pretrained weights file {value!r} does not exist; give a local timm "
                "weights file (.pth/.safetensors), 'default', or 'none' for random init"
            )
        return str(Path(value).expanduser().resolve())


class TrainConfig(StrictModel):
    """Local training settings of one site (one federated round) or of pooled training."""

    batch_size: int = Field(32, ge=1, le=4096, description="Images per optimiser step.")
    learning_rate: float = Field(1e-3, gt=0, le=1.0, description="Adam learning rate at the start of the schedule.")
    min_learning_rate_ratio: float = Field(0.05, ge=0, le=1, description="Cosine schedule floor as a fraction of the start rate.")
    weight_decay: float = Field(1e-5, ge=0, le=1.0, description="Adam weight decay.")
    local_epochs: int = Field(1, ge=1, le=100, description="Passes over the site's training split per round.")
    balance: Literal["sampler", "none"] = Field("sampler", description="WeightedRandomSampler class balancing, or none.")
    loss: Literal["ce", "weighted-ce", "focal"] = Field("ce", description="Cross-entropy, class-weighted cross-entropy, or focal loss.")
    focal_gamma: float = Field(2.0, ge=0, le=10, description="Focusing parameter of the focal loss.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the cross-entropy losses.")
    grad_clip_norm: float | None = Field(2.0, gt=0, description="Clip the global gradient norm to this value; None turns it off.")
    amp: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Mixed precision: auto = fp16+GradScaler on CUDA, bf16 on CPU only when measured faster; "
        "on = always (fp16 on CUDA, bf16 on CPU); off = fp32.",
    )
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'.")
    augment: bool = Field(True, description="Train-time flips, rotation, scale and colour jitter.")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="Cap on optimiser steps per epoch (smoke runs).")
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes.")
    proximal_mu: float = Field(0.0, ge=0, description="FedProx proximal term weight (0 = plain local SGD).")
    progress: bool = Field(True, description="Show progress bars when attached to a terminal.")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda", "mps") or value.startswith("cuda:"):
            return value
        raise ValueError(f"device {value!r} is not one of auto, cpu, cuda, cuda:N, mps")

    @model_validator(mode="after")
    def _focal_gamma_only_with_focal(self) -> TrainConfig:
        if self.loss != "focal" and self.focal_gamma != 2.0:
            raise ValueError("focal_gamma is set but loss is not 'focal'; set loss='focal' or drop focal_gamma")
        return self


class FederationConfig(StrictModel):
    """How the server runs the federation: rounds, strategy and site sampling."""

    rounds: int = Field(5, ge=1, le=10000, description="Federated rounds of classifier training.")
    strategy: Literal["fedavg", "fedprox", "fedadam"] = Field("fedavg", description="Aggregation strategy.")
    proximal_mu: float = Field(0.01, ge=0, description="FedProx proximal weight (used only with strategy fedprox).")
    server_learning_rate: float = Field(
        0.01, gt=0, le=10, description="FedAdam server step size (used only with strategy fedadam)."
    )
    fraction_train: float = Field(1.0, gt=0, le=1, description="Fraction of connected sites asked to train each round.")
    min_sites: int = Field(2, ge=1, description="Minimum connected sites before a round starts.")
    round_timeout_s: float = Field(3600.0, gt=0, description="Seconds to wait for site replies in a round.")


class RunConfig(StrictModel):
    """Everything that defines one federated (or pooled) training run."""

    classes: list[str] = Field(
        default_factory=lambda: ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"],
        min_length=2,
        description="Ordered class list; fixes label indices and travels with every saved model.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    split_fractions: tuple[float, float, float] = Field(
        (0.7, 0.15, 0.15), description="Train/val/test fractions of every site, split by lesion or patient."
    )
    seed: int = Field(0, ge=0, description="Seed for splits, partitions, initialisation and sampling.")

    @field_validator("classes")
    @classmethod
    def _classes_unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"classes {value} contain duplicates; list each class once")
        return value

    @field_validator("split_fractions")
    @classmethod
    def _fractions_sum_to_one(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(part <= 0 for part in value) or abs(sum(value) - 1.0) > 1e-6:
            raise ValueError(f"split fractions {value} must be three positive numbers summing to 1, e.g. 0.7,0.15,0.15")
        return value

    @model_validator(mode="after")
    def _strategy_settings_consistent(self) -> RunConfig:
        if self.train.proximal_mu > 0 and self.federation.strategy != "fedprox":
            raise ValueError("train.proximal_mu is set but the strategy is not fedprox; use federation.proximal_mu with strategy fedprox")
        return self


FLOWER_RUN_CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "num-server-rounds": ("federation", "rounds"),
    "strategy": ("federation", "strategy"),
    "proximal-mu": ("federation", "proximal_mu"),
    "server-learning-rate": ("federation", "server_learning_rate"),
    "fraction-train": ("federation", "fraction_train"),
    "min-sites": ("federation", "min_sites"),
    "round-timeout": ("federation", "round_timeout_s"),
    "model": ("model", "name"),
    "pretrained": ("model", "pretrained"),
    "image-size": ("preprocess", "image_size"),
    "colour-constancy": ("preprocess", "colour_constancy"),
    "clahe": ("preprocess", "clahe"),
    "batch-size": ("train", "batch_size"),
    "learning-rate": ("train", "learning_rate"),
    "weight-decay": ("train", "weight_decay"),
    "local-epochs": ("train", "local_epochs"),
    "balance": ("train", "balance"),
    "loss": ("train", "loss"),
    "focal-gamma": ("train", "focal_gamma"),
    "grad-clip-norm": ("train", "grad_clip_norm"),
    "amp": ("train", "amp"),
    "augment": ("train", "augment"),
    "max-steps-per-epoch": ("train", "max_steps_per_epoch"),
    "classes": ("classes",),
    "split-fractions": ("split_fractions",),
    "seed": ("seed",),
}
"""Flat kebab-case keys of `[tool.flwr.app.config]` and where each lands in `RunConfig`."""

_UNSET_NUMBER = 0
"""Flower config values cannot be None: 0 means 'off' for the optional numeric keys."""


def run_config_from_flower(flat: dict) -> RunConfig:
    """Build a validated `RunConfig` from Flower's flat kebab-case run config."""
    unknown = sorted(set(flat) - set(FLOWER_RUN_CONFIG_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown run-config key(s) {unknown}; known keys are {sorted(FLOWER_RUN_CONFIG_KEYS)}"
        )
    nested: dict = {}
    for key, value in flat.items():
        path = FLOWER_RUN_CONFIG_KEYS[key]
        if key in ("classes", "split-fractions") and isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if key in ("grad-clip-norm", "max-steps-per-epoch") and value == _UNSET_NUMBER:
            value = None
        target = nested
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    try:
        return RunConfig.model_validate(nested)
    except ValueError as error:
        raise ConfigError(f"invalid run config: {error}") from error


class RoundInstructions(StrictModel):
    """What the server sends every site for one round: the run settings and this round's schedule."""

    run: RunConfig
    server_round: int = Field(ge=1)
    learning_rate_start: float = Field(gt=0)
    learning_rate_end: float = Field(gt=0)

    @classmethod
    def for_round(cls, run: RunConfig, server_round: int) -> RoundInstructions:
        """Instructions for `server_round`: the cosine schedule over all rounds' local epochs.

        Sites receive the weights, so the server-side `pretrained` choice is not sent.
        """
        from shared.training import cosine_learning_rate

        total = run.federation.rounds
        base, floor = run.train.learning_rate, run.train.min_learning_rate_ratio
        site_run = run.model_copy(update={"model": run.model.model_copy(update={"pretrained": "none"})})
        if run.federation.strategy == "fedprox":
            site_run = site_run.model_copy(
                update={"train": run.train.model_copy(update={"proximal_mu": run.federation.proximal_mu})}
            )
        return cls(
            run=site_run,
            server_round=server_round,
            learning_rate_start=cosine_learning_rate(base, floor, (server_round - 1) / total),
            learning_rate_end=cosine_learning_rate(base, floor, server_round / total),
        )
