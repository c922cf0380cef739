"""DP-SGD local training of a site (Opacus): per-sample clipping, Gaussian noise, Poisson batches, RDP ledger."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from shared.config import RunConfig
from shared.data.cache import CachedImages
from shared.data.loading import ImageArrayDataset
from shared.data.transforms import build_train_transform
from shared.errors import ConfigError, DataError, ModelError
from shared.models.classifier import model_normalisation
from shared.precision import Precision
from shared.privacy.accounting import PrivacyBudgetExceeded, PrivacyLedger, RoundSchedule, epsilon_of
from shared.privacy.head_training import train_private_head
from shared.privacy.model_preparation import grad_sample_mode_for, is_prepared_for_privacy
from shared.privacy.per_sample_gradients import install_fast_per_sample_gradients
from shared.privacy.site_policy import PrivacyPolicyRefused
from shared.training import TrainResult, inverse_frequency_weights, log_class_prior, place_model, set_cosine_step_rate


@dataclass(kw_only=True)
class PrivacyFigures:
    """What a DP-SGD round adds to its training figures: noise, sampling and the epsilon the site has spent."""

    epsilon: float = 0.0
    epsilon_next_round: float = 0.0
    delta: float = 0.0
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0


@dataclass
class PrivateTrainResult(TrainResult, PrivacyFigures):
    """A classifier round under DP-SGD: the training figures, its privacy figures and the per-sample-gradient mode."""

    grad_sample_mode: str = ""
    signal_to_noise: float | None = None
    """Linear-head recipe: measured at the start of the round; stays at the site (it describes its data)."""


class PerSampleLoss(nn.Module):
    """Cross-entropy (optionally class-weighted or of prior-shifted logits) or focal loss of each image, then reduced.

    The weighted mean over the batch is not used under DP: it divides by the batch's summed
    weights, which would make one image's gradient depend on the other images in the batch.
    `reduction` is 'mean' (plain mean over images) or 'none', as Opacus's ghost clipping sets it.
    """

    def __init__(
        self,
        kind: str,
        *,
        label_smoothing: float,
        focal_gamma: float,
        weight: torch.Tensor | None,
        logit_shift: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.label_smoothing = label_smoothing
        self.focal_gamma = focal_gamma
        self.reduction = "mean"
        self.register_buffer("weight", weight)
        self.register_buffer("logit_shift", logit_shift)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-image losses (reduction 'none') or their mean."""
        logits = logits.float()
        if self.logit_shift is not None:
            logits = logits + self.logit_shift
        if self.kind == "focal":
            log_probabilities = F.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
            losses = -((1 - log_probabilities.exp()) ** self.focal_gamma) * log_probabilities
        else:
            losses = F.cross_entropy(logits, targets, reduction="none", label_smoothing=self.label_smoothing)
            if self.weight is not None:
                losses = losses * self.weight[targets]
        return losses if self.reduction == "none" else losses.mean()


@contextmanager
def quiet_opacus() -> Iterator[None]:
    """Silence Opacus's notices about choices made here on purpose (non-secure RNG: simulation-grade noise
    generator seeded per round; full backward hooks firing on the input layer)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message=".*Optimal order is the (largest|smallest) alpha.*")
        yield


def check_private_precision(precision: Precision) -> None:
    """Refuse the precisions DP-SGD cannot use: a GradScaler (clips scaled gradients) and fp16 (NaNs)."""
    if precision.use_grad_scaler:
        raise ConfigError(
            f"precision {precision.name} uses a GradScaler, and Opacus would clip the scaled per-sample gradients "
            "(the privacy guarantee would not hold); under DP use bf16 or fp32 (amp auto picks them)"
        )
    if precision.autocast_dtype == torch.float16:
        raise ConfigError("fp16 autocast under DP-SGD produced NaN gradients; use bf16 or fp32 (amp off)")


def refuse_past_budget(
    ledger: PrivacyLedger, schedule: RoundSchedule, run: RunConfig, what: str, released_first: list[tuple[float, float, int]] = ()
) -> None:
    """Raise PrivacyBudgetExceeded, before any step, when `schedule` (after the releases `released_first`, as
    accountant entries) would take the site past the run's epsilon."""
    budget = run.privacy.target_epsilon
    planned = list(released_first) + [schedule.entry()]
    epsilon_after = epsilon_of(ledger.history + planned, ledger.delta)
    if budget is not None and epsilon_after > budget + 1e-9:
        raise PrivacyBudgetExceeded(
            f"{ledger.site}: {what} would raise the spent epsilon from {ledger.epsilon:.3f} to {epsilon_after:.3f}, "
            f"past the budget {budget}; the run must stop here (raise privacy.target_epsilon or start a new run "
            "to train further)"
        )
    if ledger.lifetime_epsilon is not None:
        lifetime_after = ledger.lifetime_epsilon_after(planned)
        if lifetime_after > ledger.lifetime_epsilon + 1e-9:
            raise PrivacyPolicyRefused(
                f"{ledger.site}: {what} would take the epsilon spent on this site's images over all its runs to "
                f"{lifetime_after:.3f} (delta {ledger.delta:g}), past the site's lifetime cap {ledger.lifetime_epsilon}; "
                "the site trains no further under this cap (only the site's own [privacy] lifetime-epsilon can change it)"
            )


def record_steps_taken(ledger: PrivacyLedger, round_label: int | str, schedule: RoundSchedule, engine) -> None:
    """Append the DP-SGD steps an Opacus engine took to the site's ledger (none taken: nothing recorded)."""
    taken = sum(entry[2] for entry in engine.accountant.history)
    if taken:
        ledger.record(round_label, schedule.noise_multiplier, schedule.sample_rate, taken)


def make_private(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    schedule: RoundSchedule,
    run: RunConfig,
    mode: str,
    device: torch.device,
    seed: int,
    criterion: nn.Module | None = None,
) -> tuple:
    """An RDP Opacus engine and its private (module, optimizer, [criterion,] loader) at the round's noise, clipping and sampling."""
    from opacus import PrivacyEngine

    install_fast_per_sample_gradients()
    options = {"criterion": criterion} if criterion is not None else {}
    with quiet_opacus():
        engine = PrivacyEngine(accountant="rdp")
        prepared = engine.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=schedule.noise_multiplier,
            max_grad_norm=run.privacy.max_grad_norm,
            poisson_sampling=run.privacy.poisson_sampling,
            grad_sample_mode=mode,
            noise_generator=torch.Generator(device=device).manual_seed(seed + 1),
            **options,
        )
    return engine, prepared


def train_privately(
    model: nn.Module,
    images: CachedImages,
    *,
    run: RunConfig,
    ledger: PrivacyLedger,
    server_round: int,
    device: torch.device,
    precision: Precision,
    learning_rate_start: float,
    learning_rate_end: float,
    seed: int,
    description: str = "train (DP-SGD)",
) -> PrivateTrainResult:
    """One round of DP-SGD on the site's training images; the weights in `model` are updated in place.

    Under the linear-head recipe (the default) this is `train_private_head`: the classification
    layer over the site's cached frozen features.

    `model` must be prepared (`prepare_for_private_training`). The round is refused before any
    step when it would take the site past the run's epsilon budget. Every step's noise and
    sampling are appended to the site's ledger, which survives restarts and resumed runs.
    """
    privacy, config = run.privacy, run.train
    if not privacy.local:
        raise ConfigError("train_privately needs privacy.mode 'local'")
    if privacy.linear_head:
        # The head recipe sets its own rate (privacy.head_learning_rate): the fine-tune schedule does not apply.
        return train_private_head(
            model, images, run=run, ledger=ledger, server_round=server_round, device=device, precision=precision, seed=seed,
            description=description,
        )
    if not is_prepared_for_privacy(model):
        raise ModelError("the model was not prepared for DP-SGD; call prepare_for_private_training on it (and on the server's model)")
    check_private_precision(precision)
    if len(images) < 2:
        raise DataError(f"{images.source or 'this site'}: DP-SGD needs at least 2 training images; add images to this site")
    schedule = RoundSchedule.for_site(run, len(images))
    refuse_past_budget(ledger, schedule, run, f"round {server_round}")
    device = torch.device(device)
    place_model(model, device).train()
    mean, std = model_normalisation(model)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        ImageArrayDataset(images, build_train_transform(mean, std, augment=config.augment)),
        batch_size=config.batch_size,
        shuffle=True,
        num_workers=config.num_workers,
        generator=generator,
    )
    weight = inverse_frequency_weights(images.class_counts()) if config.loss == "weighted-ce" else None
    logit_shift = log_class_prior(images.class_counts()) if config.loss == "balanced-softmax" else None
    criterion = PerSampleLoss(
        config.loss,
        label_smoothing=config.label_smoothing,
        focal_gamma=config.focal_gamma,
        weight=weight,
        logit_shift=logit_shift,
    ).to(device)
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=learning_rate_start, weight_decay=config.weight_decay)
    mode = grad_sample_mode_for(run.model.name, privacy.grad_sample_mode)
    engine, prepared = make_private(model, optimizer, loader, schedule=schedule, run=run, mode=mode, device=device, seed=seed, criterion=criterion)
    if mode == "ghost":
        private_model, private_optimizer, private_criterion, private_loader = prepared
    else:
        private_model, private_optimizer, private_loader = prepared
        private_criterion = criterion

    loss_sum, num_examples, step = 0.0, 0, 0
    total_steps = schedule.steps
    steps_per_epoch = total_steps // config.whole_local_epochs()
    started = time.perf_counter()
    try:
        with quiet_opacus():
            for epoch in range(config.whole_local_epochs()):
                for batch_index, (batch_images, labels) in enumerate(private_loader):
                    if batch_index >= steps_per_epoch:
                        break
                    set_cosine_step_rate(private_optimizer, learning_rate_start, learning_rate_end, step, total_steps)
                    batch_images = batch_images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                    labels = labels.to(device, non_blocking=True)
                    private_optimizer.zero_grad(set_to_none=True)
                    with precision.autocast():
                        logits = private_model(batch_images)
                    loss = private_criterion(logits.float(), labels)
                    loss.backward()
                    private_optimizer.step()
                    batch_size = int(labels.shape[0])
                    if batch_size:
                        data_loss = float(loss.detach().float().mean().item()) if mode != "ghost" else float(loss.loss_per_sample.mean().item())
                        if not math.isfinite(data_loss):
                            raise ConfigError(
                                f"{description}: the training loss became {data_loss} at epoch {epoch + 1}, step "
                                f"{batch_index + 1} (precision {precision.name}); lower the learning rate or use amp off"
                            )
                        loss_sum += data_loss * batch_size
                        num_examples += batch_size
                    step += 1
    finally:
        # Every step taken was released in the weights this site may send: record them even on failure.
        record_steps_taken(ledger, server_round, schedule, engine)
        # Removes Opacus's hooks and per-sample gradients, so the plain model can be sent and reused.
        private_model._close()
    seconds = time.perf_counter() - started
    epsilon = ledger.epsilon
    return PrivateTrainResult(
        loss=loss_sum / max(num_examples, 1),
        num_examples=num_examples,
        steps=step,
        seconds=seconds,
        images_per_second=num_examples / seconds if seconds > 0 else float("inf"),
        epsilon=epsilon,
        epsilon_next_round=ledger.epsilon_after(schedule),
        delta=ledger.delta,
        noise_multiplier=schedule.noise_multiplier,
        sample_rate=schedule.sample_rate,
        grad_sample_mode=mode,
    )


def private_train_metrics(result) -> dict[str, float]:
    """The privacy figures a site reports each round, classifier or GAN (all scalars; none for a round without DP)."""
    if not isinstance(result, PrivacyFigures):
        return {}
    return {
        "epsilon": float(result.epsilon),
        "epsilon-next-round": float(result.epsilon_next_round),
        "delta": float(result.delta),
        "noise-multiplier": float(result.noise_multiplier),
        "sample-rate": float(result.sample_rate),
        "dp-steps": float(result.steps),
    }
