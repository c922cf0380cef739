"""Typed, validated settings shared by the site trainer, the server and the simulation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from shared.errors import ConfigError

DATA_FORMATS = ("ham10000", "isic2019", "isic2020", "folder", "demo")
DEFAULT_MODEL = "tf_efficientnet_lite0"


FROM_COORDINATOR = {"from_coordinator": True}
"""Validation context of settings a site receives in a message: the files they name (a GAN checkpoint,
a feature classifier) live on the coordinator's disk, so a site does not look for them on its own."""


def _received_from_coordinator(info: ValidationInfo) -> bool:
    return bool((info.context or {}).get("from_coordinator", False))


class StrictModel(BaseModel):
    """Base for settings: unknown keys are an error, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @classmethod
    def from_coordinator(cls, text: str):
        """These settings as a site receives them in a message (JSON): files they name are the coordinator's."""
        return cls.model_validate_json(text, context=FROM_COORDINATOR)


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
    local_epochs: float = Field(
        1,
        gt=0,
        le=100,
        description="Passes over the site's training split per round; a fraction (0.25) runs that share of one "
        "pass, so more, shorter rounds cover the same epochs with less drift between sites.",
    )
    local_steps: int | None = Field(
        None,
        ge=1,
        description="Optimiser steps per round, the same at every site (None: local_epochs passes over the site's "
        "images). With epochs a large site counts twice, by its averaging weight and by its longer local "
        "training; with equal steps each site counts by its number of images, as in pooled training.",
    )
    balance: Literal["sampler", "global", "none"] = Field(
        "sampler",
        description="Class balance of the training batches: 'sampler' balances the site's own classes; 'global' "
        "samples each image by one over the federation's images of its class and lets a site train and count by "
        "its share of a class-balanced pass over all sites' images (the pooled balanced objective; the server "
        "sends the summed class counts); 'none' samples uniformly.",
    )
    loss: Literal["ce", "weighted-ce", "focal", "balanced-softmax"] = Field(
        "ce",
        description="Cross-entropy, class-weighted cross-entropy, focal loss, or balanced softmax (cross-entropy of "
        "the logits plus the log of the class frequencies of the site's batches: learns a class-balanced classifier "
        "whatever the site's class mix, and a site never pushes down a class it has no images of).",
    )
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

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainConfig:
        if self.local_steps is not None and (self.local_epochs != 1 or self.max_steps_per_epoch is not None):
            raise ValueError(
                "local_steps fixes the steps of a round, so local_epochs and max_steps_per_epoch do not apply; "
                "set local_steps alone, or drop it and use local_epochs"
            )
        if not float(self.local_epochs).is_integer() and self.max_steps_per_epoch is not None:
            raise ValueError(
                f"local_epochs {self.local_epochs} is a share of one pass, which max_steps_per_epoch would cut again; "
                "drop max_steps_per_epoch or use whole local_epochs"
            )
        return self

    def whole_local_epochs(self) -> int | None:
        """local_epochs as a count of whole passes, or None when it is a share of one pass."""
        return int(self.local_epochs) if float(self.local_epochs).is_integer() else None

    def steps_of_partial_epoch(self, num_images: int) -> int | None:
        """Optimiser steps of a round whose local_epochs is a share of one pass (None for whole passes)."""
        if self.whole_local_epochs() is not None:
            return None
        return max(1, round(self.local_epochs * math.ceil(num_images / self.batch_size)))


class FederationConfig(StrictModel):
    """How the server runs the federation: rounds, strategy and site sampling."""

    rounds: int = Field(5, ge=1, le=10000, description="Federated rounds of classifier training.")
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedavgm"] = Field(
        "fedavg", description="Aggregation strategy: FedAvg, FedProx, FedAdam or FedAvgM (server momentum)."
    )
    proximal_mu: float = Field(0.01, ge=0, description="FedProx proximal weight (used only with strategy fedprox).")
    server_learning_rate: float = Field(
        0.01, gt=0, le=10, description="FedAdam server step size (used only with strategy fedadam; FedAvgM steps 1.0)."
    )
    server_momentum: float = Field(0.9, ge=0, lt=1, description="FedAvgM server momentum (used only with strategy fedavgm).")
    fraction_train: float = Field(1.0, gt=0, le=1, description="Fraction of connected sites asked to train each round.")
    min_sites: int = Field(2, ge=1, description="Minimum connected sites before a round starts.")
    round_timeout_s: float = Field(3600.0, gt=0, description="Seconds to wait for site replies in a round.")
    calibrate: bool = Field(
        True,
        description="Temperature-scale the handed-on model on the sites' validation splits (the sites send summed "
        "likelihoods only), so that its probabilities mean what they say; the top class does not change.",
    )
    prior_correction: bool = Field(
        True,
        description="Balance the handed-on model's class prior: per-class logit offsets fitted so that, on the sites' "
        "validation splits with every class weighted equally, the mean prediction is uniform (the sites send "
        "summed probabilities per true class only); it raises the recall of the classes few sites hold.",
    )
    head_refit_steps: int | None = Field(
        None,
        ge=0,
        le=1000,
        description="Refit the handed-on model's top (refit_layers) over the sites' training images, class-balanced "
        "over the federation, in this many steps (each one query; the sites send the layers' summed loss and gradient "
        "and validation confusion counts; the refitted layers are kept unless they score below the trained ones on "
        "validation). 0: off. None: 30 in runs without privacy, off in private runs (the gradients are not accounted).",
    )
    refit_layers: Literal["classification-layer", "last-stage"] = Field(
        "classification-layer",
        description="What the refit trains: 'classification-layer' (that layer alone, L-BFGS) or 'last-stage' (the last "
        "block stage, head convolution and BatchNorm with the classification layer; full-batch Adam steps over the "
        "sites' cached activations, each step one query; measured in README, not the default).",
    )
    batch_norm: Literal["average", "recalibrate"] = Field(
        "average",
        description="BatchNorm statistics of the global model: the average of the sites' statistics after local "
        "training, or recalibrate (every site measures the aggregated model's statistics on its training images, "
        "merged exactly into pooled statistics; one extra forward pass per site and round).",
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        description="End the run when this many rounds in a row have not improved the sites' pooled validation "
        "balanced accuracy (None: run every round).",
    )
    select_model: Literal["best-validation", "last-round"] = Field(
        "best-validation",
        description="The model a run hands on (final_model.pt, site reports): the round with the best balanced "
        "accuracy on the sites' pooled validation splits, or the last round's.",
    )


class GanConfig(StrictModel):
    """The federated conditional GAN: phase length, networks, local training, selection and augmentation."""

    rounds: int = Field(0, ge=0, le=10000, description="Federated GAN rounds before the classifier rounds (0 = no GAN phase).")
    only: bool = Field(False, description="GAN-only run: train (and sample) the GAN, skip the classifier rounds.")
    generator: str | None = Field(
        None, description="Saved generator file (a GAN checkpoint) to start from or, with rounds 0, to augment with."
    )
    start_round: int = Field(1, ge=1, description="First GAN round to run (a resumed run continues after its checkpoint).")
    feature_classifier: str | None = Field(
        None,
        description="Saved classifier whose penultimate features measure GAN quality and drive selection "
        "(None: the run's initial global classifier).",
    )
    image_size: int = Field(64, ge=32, le=128, description="Generated image side in pixels: 32, 64 or 128.")
    latent_dim: int = Field(128, ge=8, le=1024, description="Length of the generator's noise vector.")
    channels: int = Field(64, ge=8, le=512, description="Base channel width of generator and discriminator.")
    local_steps: int = Field(50, ge=1, le=100000, description="Discriminator+generator steps each site runs per GAN round.")
    batch_size: int = Field(32, ge=2, le=1024, description="Real (and fake) images per GAN step.")
    generator_learning_rate: float = Field(2e-4, gt=0, le=1.0, description="Adam rate of the generator.")
    discriminator_learning_rate: float = Field(2e-4, gt=0, le=1.0, description="Adam rate of the discriminator.")
    balanced_batches: bool | None = Field(
        None,
        description="Draw real GAN batches class-balanced, so rare classes are learnt too (None: balanced, except under "
        "local DP-SGD, whose accounting needs every image sampled with the same probability).",
    )
    amp: Literal["auto", "on", "off"] = Field("auto", description="Mixed precision of GAN training (as train.amp).")
    diff_augment: list[Literal["color", "translation", "cutout"]] = Field(
        default_factory=lambda: ["color", "translation", "cutout"],
        description="Differentiable augmentations of every image the discriminator sees, real and generated "
        "(DiffAugment; keeps it from memorising a few hundred images); empty for none.",
    )
    grid_every: int = Field(1, ge=1, description="Write a per-class sample grid PNG (and quality figures) every K GAN rounds.")
    augment: bool = Field(False, description="Add selected synthetic images of the site's minority classes to its training split.")
    target: Literal["median", "ratio"] = Field(
        "median", description="Synthesise up to the site's median class count, or up to ratio x its largest class."
    )
    target_ratio: float = Field(0.25, gt=0, le=1, description="With target 'ratio': fill classes up to this fraction of the largest class.")
    max_synthetic_per_class: int = Field(300, ge=0, description="Cap on synthetic images added to one class at one site.")
    candidates_per_image: float = Field(2.0, ge=1, le=20, description="Candidates generated per synthetic image needed (selection slack).")
    realism_reject_fraction: float = Field(
        0.25, ge=0, lt=1, description="Per class, drop this fraction of candidates with the lowest discriminator score."
    )
    memorisation_percentile: float = Field(
        5.0, ge=0, le=50, description="Reject a candidate closer to a real training image than this percentile of real-to-real nearest-neighbour distances."
    )
    duplicate_percentile: float = Field(
        5.0, ge=0, le=50, description="Reject a candidate closer to an already kept one than this percentile of real-to-real NN distances."
    )

    @field_validator("image_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value not in (32, 64, 128):
            raise ValueError(f"GAN image size {value} is not one of 32, 64, 128; the networks double or halve the side per block")
        return value

    @field_validator("generator")
    @classmethod
    def _generator_file_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or _received_from_coordinator(info):
            return value
        if not Path(value).expanduser().is_file():
            raise ValueError(f"generator file {value!r} does not exist; give a GAN checkpoint (gan/checkpoints/round_NNN.pt)")
        return str(Path(value).expanduser().resolve())

    @field_validator("feature_classifier")
    @classmethod
    def _feature_classifier_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or _received_from_coordinator(info):
            return value
        if not Path(value).expanduser().is_file():
            raise ValueError(f"feature classifier {value!r} does not exist; give a saved classifier (final_model.pt) or leave it unset")
        return str(Path(value).expanduser().resolve())

    @model_validator(mode="after")
    def _phase_settings_consistent(self) -> GanConfig:
        if self.only and self.rounds == 0:
            raise ValueError("a GAN-only run needs GAN rounds; set gan.rounds (--gan-rounds) above 0")
        if self.only and self.augment:
            raise ValueError("a GAN-only run trains no classifier, so augmentation has nothing to feed; drop one of them")
        if self.augment and self.rounds == 0 and self.generator is None:
            raise ValueError("augmentation needs a generator: set gan.rounds above 0 or gan.generator to a saved one")
        if self.start_round > 1 and self.generator is None:
            raise ValueError("gan.start_round > 1 resumes a GAN phase and needs gan.generator (its last checkpoint)")
        return self

    @property
    def active(self) -> bool:
        """Whether the run has any GAN work: training rounds or augmentation."""
        return self.rounds > 0 or self.augment


HEAD_STEPS_PER_ROUND = 20
HEAD_LEARNING_RATE = 0.01
HEAD_MOMENTUM = 0.9
HEAD_CLIPPING_NORM = 20.0
HEAD_DELTA = 1e-5
"""Defaults of the linear-head DP recipe, from `python -m simulation.privacy_curve` (see README)."""


class PrivacyConfig(StrictModel):
    """Differential privacy of what sites send: off, DP-SGD at every site (local), or server-side noise (central)."""

    mode: Literal["off", "local", "central"] = Field(
        "off",
        description="off; local = DP-SGD (Opacus) at every site with per-site RDP accounting; "
        "central = the server clips each site's update and adds Gaussian noise (Flower's fixed clipping).",
    )
    target_epsilon: float | None = Field(
        None, gt=0, le=1000, description="Local: the run's epsilon budget; without a noise multiplier the noise is calibrated to spend it exactly."
    )
    target_delta: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Local: the delta of the (epsilon, delta) guarantee, well below 1 / site images (None: 1e-5 under "
        "the linear-head recipe; the fine-tune recipe needs it given).",
    )
    noise_multiplier: float | None = Field(
        None,
        gt=0,
        le=100,
        description="Noise std over the clipping norm; local: fixed noise (with a target epsilon the run stops at the "
        "budget); central: required.",
    )
    max_grad_norm: float | None = Field(
        None,
        gt=0,
        description="Local: per-sample gradient clipping norm (replaces train.grad_clip_norm; None: 20 under the "
        "linear-head recipe, measured for its features; the fine-tune recipe needs it given); central: clipping norm "
        "of each site's update.",
    )
    poisson_sampling: bool = Field(True, description="Local: Poisson-sampled batches, which the RDP accounting assumes.")
    recipe: Literal["linear-head", "fine-tune"] | None = Field(
        None,
        description="Local: what DP-SGD trains. linear-head = only the classification layer, over the frozen "
        "pretrained network's features computed once per site (BatchNorm statistics as learnt, no augmentation), "
        "full-batch steps, class balance from noisy class counts that the budget pays for; fine-tune = the "
        "network (or its last trainable_stages stages) on augmented images. None: fine-tune when trainable_stages "
        "is given, else linear-head.",
    )
    trainable_stages: int | None = Field(
        None,
        ge=0,
        le=16,
        description="Local, recipe fine-tune: train only the classifier's last N feature stages and its head under "
        "DP-SGD (0 = the classification layer only); the layers before stay frozen with their pretrained BatchNorm "
        "statistics. Fewer noised parameters and faster steps; None = the whole network.",
    )
    head_steps_per_round: int = Field(
        HEAD_STEPS_PER_ROUND, ge=1, le=100000, description="Local, recipe linear-head: DP-SGD steps of the head per site and round."
    )
    head_batch_size: int | None = Field(
        None,
        ge=2,
        description="Local, recipe linear-head: expected Poisson batch of a head step (None: every image in every "
        "step, the least noise per image).",
    )
    head_learning_rate: float = Field(
        HEAD_LEARNING_RATE, gt=0, le=100, description="Local, recipe linear-head: SGD rate of the head (constant; the mean clipped gradient is small)."
    )
    head_momentum: float = Field(HEAD_MOMENTUM, ge=0, lt=1, description="Local, recipe linear-head: SGD momentum of the head.")
    grad_sample_mode: Literal["auto", "hooks", "functorch", "ghost"] = Field(
        "auto",
        description="Local: how Opacus computes per-sample gradients of the classifier; auto = the fastest measured for the "
        "architecture. The GAN discriminator uses hooks, or functorch when that is chosen here.",
    )

    @model_validator(mode="before")
    @classmethod
    def _linear_head_defaults(cls, data):
        """The linear-head recipe's measured delta and clipping norm: under it a budget alone is a complete setting."""
        if not isinstance(data, dict) or data.get("mode") != "local":
            return data
        recipe = data.get("recipe") or ("fine-tune" if data.get("trainable_stages") is not None else "linear-head")
        if recipe != "linear-head":
            return data
        filled = dict(data)
        for name, default in (("target_delta", HEAD_DELTA), ("max_grad_norm", HEAD_CLIPPING_NORM)):
            if filled.get(name) is None:
                filled[name] = default
        return filled

    @model_validator(mode="after")
    def _complete_for_its_mode(self) -> PrivacyConfig:
        given = [
            name
            for name in ("target_epsilon", "target_delta", "noise_multiplier", "max_grad_norm", "trainable_stages")
            if getattr(self, name) is not None
        ]
        defaults = (
            ("poisson_sampling", True),
            ("grad_sample_mode", "auto"),
            ("recipe", None),
            ("head_steps_per_round", HEAD_STEPS_PER_ROUND),
            ("head_batch_size", None),
            ("head_learning_rate", HEAD_LEARNING_RATE),
            ("head_momentum", HEAD_MOMENTUM),
        )
        changed = [name for name, default in defaults if getattr(self, name) != default]
        if self.mode == "off":
            if given or changed:
                raise ValueError(
                    f"privacy settings {given + changed} are given but privacy.mode is 'off', so training would not be "
                    "private; set privacy.mode to 'local' (DP-SGD at every site) or 'central', or drop those settings"
                )
            return self
        if self.mode == "local":
            missing = [name for name in ("target_delta", "max_grad_norm") if getattr(self, name) is None]
            if self.target_epsilon is None and self.noise_multiplier is None:
                missing.append("target_epsilon (or noise_multiplier)")
            if missing:
                raise ValueError(
                    f"local differential privacy is partly configured: {missing} missing; give a target_epsilon "
                    "(noise calibrated to it) or a noise_multiplier, and under the fine-tune recipe target_delta "
                    "and max_grad_norm too"
                )
            if self.recipe == "linear-head" and self.trainable_stages is not None:
                raise ValueError(
                    "privacy.trainable_stages chooses what the fine-tune recipe trains, but privacy.recipe is "
                    "'linear-head' (the classification layer only); drop trainable_stages or set recipe 'fine-tune'"
                )
            if self.recipe is None:
                self.recipe = "fine-tune" if self.trainable_stages is not None else "linear-head"
            return self
        if self.noise_multiplier is None or self.max_grad_norm is None:
            raise ValueError(
                "central differential privacy needs noise_multiplier and max_grad_norm (the clipping norm of a "
                "site's update); give both"
            )
        unused = [name for name in ("target_epsilon", "target_delta", "trainable_stages", "recipe") if getattr(self, name) is not None]
        unused += [name for name in changed if name not in unused]
        if unused:
            raise ValueError(
                f"{unused} apply to local DP-SGD only; central mode (server-side clipping and noise) has no "
                "per-site accounting; drop them or use privacy.mode 'local'"
            )
        return self

    @property
    def local(self) -> bool:
        """Whether every site trains with DP-SGD."""
        return self.mode == "local"

    @property
    def linear_head(self) -> bool:
        """Whether every site trains only the classification layer over cached frozen features (local DP)."""
        return self.local and self.recipe == "linear-head"

    @property
    def prepared_stages(self) -> int | None:
        """The `trainable_stages` a model is prepared with for this run: 0 for the linear head."""
        return 0 if self.linear_head else self.trainable_stages


class ReportConfig(StrictModel):
    """The local report every site writes at the end of a run (metrics, plots, Grad-CAM gallery)."""

    site_reports: bool = Field(True, description="Ask every site for its local report after the last round.")
    gallery_per_class: int = Field(3, ge=0, le=50, description="Correct and wrong Grad-CAM examples per class in the gallery.")
    gradcam_method: Literal["gradcam", "gradcam++"] = Field("gradcam", description="Saliency method of the gallery.")
    personalise_epochs: float = Field(
        0.0,
        ge=0,
        le=20,
        description="Passes (or a share of one) over the site's training split that fine-tune the final global model "
        "into the site's personalised model, reported beside the global one (0: no personalised model).",
    )
    personalise_learning_rate: float = Field(
        1e-4, gt=0, le=1.0, description="Start of the personalising fine-tune's cosine (it ends at the run's floor ratio)."
    )


class TrackingConfig(StrictModel):
    """Where the server also writes the per-round metrics for a dashboard."""

    tensorboard: bool = Field(False, description="TensorBoard event files in the run folder's tensorboard/ (the [tracking] extra).")


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
    gan: GanConfig = Field(default_factory=GanConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
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

    def head_refit_steps(self) -> int:
        """Queries of the classification layer's refit this run takes: the setting, else 30 without privacy, 0 with."""
        from shared.head_refit import HEAD_REFIT_STEPS

        if self.federation.head_refit_steps is not None:
            return self.federation.head_refit_steps
        return HEAD_REFIT_STEPS if self.privacy.mode == "off" else 0

    @model_validator(mode="after")
    def _head_refit_fits_the_privacy(self) -> RunConfig:
        if (self.federation.head_refit_steps or 0) > 0 and self.privacy.mode != "off":
            raise ValueError(
                f"the head refit's gradients leave the sites outside the privacy budget (privacy.mode "
                f"{self.privacy.mode!r}); set federation.head_refit_steps 0 or leave it unset in a private run"
            )
        return self

    @model_validator(mode="after")
    def _privacy_fits_the_run(self) -> RunConfig:
        if not self.privacy.local:
            return self
        if self.federation.batch_norm == "recalibrate":
            raise ValueError(
                "BatchNorm statistics measured on the training images would leave each site outside the DP-SGD "
                "accounting (and a privately trained model has no BatchNorm statistics to recalibrate); keep "
                "federation.batch_norm 'average' with privacy.mode 'local'"
            )
        if self.train.local_steps is not None:
            raise ValueError(
                "local DP-SGD plans its steps from Poisson-sampled epochs (the accounting depends on them), so "
                "train.local_steps does not apply; drop it and use train.local_epochs"
            )
        if self.train.whole_local_epochs() is None:
            raise ValueError(
                f"local DP-SGD accounts whole Poisson-sampled epochs, so train.local_epochs {self.train.local_epochs} "
                "(a share of one pass) does not apply; use a whole number of local epochs"
            )
        if self.train.balance != "none":
            raise ValueError(
                "local DP-SGD samples every image with the same probability (the accounting assumes it) and a "
                f"class-balanced sampler (balance {self.train.balance!r}) breaks that; set train.balance 'none' (loss 'weighted-ce' balances classes)"
            )
        if self.federation.strategy == "fedprox" or self.train.proximal_mu > 0:
            raise ValueError(
                "DP-SGD replaces each step's gradient by a clipped, noised one, which drops FedProx's proximal "
                "term; use strategy fedavg or fedadam with privacy.mode 'local'"
            )
        if self.gan.balanced_batches:
            raise ValueError(
                "gan.balanced_batches draws rare-class images more often, which the DP-SGD accounting of the "
                "discriminator cannot allow; leave it unset (Poisson sampling under DP) or use privacy.mode 'off'"
            )
        if self.gan.augment:
            raise ValueError(
                "gan.augment selects synthetic images by comparing them with the site's real images (memorisation "
                "guard, duplicate threshold), outside the DP-SGD budget; in a run with privacy.mode 'local' train "
                "the GAN privately (gan.rounds) without gan.augment, and sample it with skin-fl-gan-sample"
            )
        return self


FLOWER_RUN_CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "num-server-rounds": ("federation", "rounds"),
    "strategy": ("federation", "strategy"),
    "proximal-mu": ("federation", "proximal_mu"),
    "server-learning-rate": ("federation", "server_learning_rate"),
    "server-momentum": ("federation", "server_momentum"),
    "fraction-train": ("federation", "fraction_train"),
    "min-sites": ("federation", "min_sites"),
    "round-timeout": ("federation", "round_timeout_s"),
    "select-model": ("federation", "select_model"),
    "early-stopping-patience": ("federation", "early_stopping_patience"),
    "batch-norm": ("federation", "batch_norm"),
    "calibrate": ("federation", "calibrate"),
    "prior-correction": ("federation", "prior_correction"),
    "head-refit-steps": ("federation", "head_refit_steps"),
    "refit-layers": ("federation", "refit_layers"),
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
    "local-steps": ("train", "local_steps"),
    "label-smoothing": ("train", "label_smoothing"),
    "classes": ("classes",),
    "split-fractions": ("split_fractions",),
    "seed": ("seed",),
    "gan-rounds": ("gan", "rounds"),
    "gan-only": ("gan", "only"),
    "gan-generator": ("gan", "generator"),
    "gan-image-size": ("gan", "image_size"),
    "gan-local-steps": ("gan", "local_steps"),
    "gan-diff-augment": ("gan", "diff_augment"),
    "gan-batch-size": ("gan", "batch_size"),
    "gan-amp": ("gan", "amp"),
    "gan-grid-every": ("gan", "grid_every"),
    "gan-augment": ("gan", "augment"),
    "gan-target": ("gan", "target"),
    "gan-target-ratio": ("gan", "target_ratio"),
    "gan-feature-classifier": ("gan", "feature_classifier"),
    "privacy-mode": ("privacy", "mode"),
    "privacy-target-epsilon": ("privacy", "target_epsilon"),
    "privacy-target-delta": ("privacy", "target_delta"),
    "privacy-noise-multiplier": ("privacy", "noise_multiplier"),
    "privacy-max-grad-norm": ("privacy", "max_grad_norm"),
    "privacy-poisson-sampling": ("privacy", "poisson_sampling"),
    "privacy-grad-sample-mode": ("privacy", "grad_sample_mode"),
    "privacy-trainable-stages": ("privacy", "trainable_stages"),
    "privacy-recipe": ("privacy", "recipe"),
    "privacy-head-steps-per-round": ("privacy", "head_steps_per_round"),
    "privacy-head-batch-size": ("privacy", "head_batch_size"),
    "privacy-head-learning-rate": ("privacy", "head_learning_rate"),
    "privacy-head-momentum": ("privacy", "head_momentum"),
    "site-reports": ("report", "site_reports"),
    "report-gallery-size": ("report", "gallery_per_class"),
    "report-gradcam-method": ("report", "gradcam_method"),
    "personalise-epochs": ("report", "personalise_epochs"),
    "personalise-learning-rate": ("report", "personalise_learning_rate"),
    "tensorboard": ("tracking", "tensorboard"),
}
"""Flat kebab-case keys of `[tool.flwr.app.config]` and where each lands in `RunConfig`."""

_UNSET_NUMBER = 0
"""Flower config values cannot be None: 0 means 'off' for the optional numeric keys."""
_WHOLE_NETWORK = -1
"""`privacy-trainable-stages` value for training every layer (None in `PrivacyConfig`); for `head-refit-steps`, the automatic choice."""
_PRIVACY_NUMBER_KEYS = ("privacy-target-epsilon", "privacy-target-delta", "privacy-noise-multiplier", "privacy-max-grad-norm")


def flower_value_to_setting(key: str, value):
    """A run-config value as `RunConfig` holds it: lists from comma-separated text, None for the 'unset' 0, -1 and ''."""
    if key in ("classes", "split-fractions", "gan-diff-augment") and isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if key in ("grad-clip-norm", "max-steps-per-epoch", "local-steps", "early-stopping-patience", *_PRIVACY_NUMBER_KEYS) and value == _UNSET_NUMBER:
        return None
    if key in ("gan-generator", "gan-feature-classifier") and value == "":
        return None
    if key in ("privacy-trainable-stages", "head-refit-steps") and value == _WHOLE_NETWORK:
        return None
    if (key == "privacy-recipe" and value == "") or (key == "privacy-head-batch-size" and value == _UNSET_NUMBER):
        return None
    return value


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
        target = nested
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = flower_value_to_setting(key, value)
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
    federation_class_counts: list[int] | None = Field(
        None,
        description="Training images per class summed over the sites (the server's count at the start of the run); "
        "train.balance 'global' samples and weighs by it.",
    )

    @field_validator("federation_class_counts")
    @classmethod
    def _counts_not_negative(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(count < 0 for count in value):
            raise ValueError(f"federation class counts {value} hold a negative count")
        return value

    @classmethod
    def for_round(
        cls, run: RunConfig, server_round: int, federation_class_counts: list[int] | None = None
    ) -> RoundInstructions:
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
            federation_class_counts=federation_class_counts,
        )
