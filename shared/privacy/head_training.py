"""The linear-head DP recipe: DP-SGD of the classification layer over a site's cached frozen features."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from shared.config import RunConfig
from shared.data.cache import CachedImages
from shared.errors import ConfigError, DataError, ModelError
from shared.models.frozen_features import frozen_features
from shared.precision import Precision
from shared.privacy.accounting import CLASS_COUNTS_LABEL, PrivacyLedger, RoundSchedule, classifier_batch_size
from shared.privacy.model_preparation import is_prepared_for_privacy, prepared_trainable_stages

logger = logging.getLogger(__name__)
MOSTLY_NOISE = 1.0
"""A site is warned when the noise of all its classifier steps in the run is larger than their summed clipped
gradients: the step ratio x sqrt(steps in the run) (signals add up over the steps, independent noise grows as
the square root) below this."""


def noisy_class_counts(
    ledger: PrivacyLedger, labels: np.ndarray, num_classes: int, schedule: RoundSchedule, seed: int
) -> np.ndarray:
    """The site's class counts plus Gaussian noise (std = the site's noise multiplier), released once per run.

    Adding or removing one image changes one count by one (L2 sensitivity 1), so the release is
    one Gaussian-mechanism step at sampling rate 1 in the site's ledger. Later rounds reuse the
    recorded noisy counts, which cost nothing more. Counts below one become one.
    """
    earlier = ledger.released(CLASS_COUNTS_LABEL)
    if earlier is not None:
        return np.asarray(earlier["noisy_counts"], dtype=np.float64)
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    generator = torch.Generator().manual_seed(seed + 2)
    noise = torch.randn(num_classes, generator=generator, dtype=torch.float64).numpy() * schedule.noise_multiplier
    noisy = np.maximum(counts + noise, 1.0)
    ledger.record(CLASS_COUNTS_LABEL, schedule.noise_multiplier, schedule.sample_rate, schedule.steps, {"noisy_counts": noisy.tolist()})
    return noisy


def signal_to_noise(
    head: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor, logit_shift: torch.Tensor, schedule: RoundSchedule, max_grad_norm: float
) -> float:
    """Norm of a head step's expected summed clipped gradient over the norm of its expected Gaussian noise.

    Measured at the head's current weights: the per-image gradient of a linear layer under
    cross-entropy is (softmax - one-hot) x [features, 1], clipped to `max_grad_norm`; the noise
    has std noise_multiplier x max_grad_norm in every one of the head's parameters.
    """
    with torch.no_grad():
        weight, bias = head.weight.detach().float().cpu(), head.bias.detach().float().cpu()
        probabilities = torch.softmax(torch.nn.functional.linear(features, weight, bias) + logit_shift, dim=1)
        probabilities[torch.arange(len(labels)), labels] -= 1
        norms = probabilities.norm(dim=1) * (features.norm(dim=1) ** 2 + 1).sqrt()
        scale = (max_grad_norm / norms.clamp_min(1e-12)).clamp(max=1.0)[:, None]
        summed = torch.cat([(probabilities * scale).T @ features, (probabilities * scale).sum(0)[:, None]], dim=1)
        signal = schedule.sample_rate * float(summed.norm())
    parameters = head.weight.numel() + (head.bias.numel() if head.bias is not None else 0)
    noise = schedule.noise_multiplier * max_grad_norm * math.sqrt(parameters)
    return signal / noise if noise > 0 else float("inf")


def train_private_head(
    model: torch.nn.Module,
    images: CachedImages,
    *,
    run: RunConfig,
    ledger: PrivacyLedger,
    server_round: int,
    device: torch.device,
    precision: Precision,
    seed: int,
    description: str = "train (DP-SGD, linear head)",
):
    """One round of the linear-head recipe; the classification layer of `model` is updated in place.

    The frozen part's features are computed once per site (cached) and the head takes
    `privacy.head_steps_per_round` Poisson-sampled DP-SGD steps (SGD with momentum, constant rate)
    of balanced softmax, whose class prior is the site's noisy class counts (released once,
    accounted in the ledger). The whole round, counts included, is refused before anything is
    released when it would pass the budget.
    """
    from shared.privacy.training import PerSampleLoss, PrivateTrainResult, make_private, quiet_opacus, record_steps_taken, refuse_past_budget

    privacy = run.privacy
    if not is_prepared_for_privacy(model) or prepared_trainable_stages(model) != 0:
        raise ModelError("the linear-head recipe trains a model prepared with trainable_stages 0; call prepare_for_private_training(model, 0)")
    if len(images) < 2:
        raise DataError(f"{images.source or 'this site'}: DP-SGD needs at least 2 training images; add images to this site")
    schedule = RoundSchedule.for_site(run, len(images))
    counts_schedule = RoundSchedule.for_class_counts(run, len(images))
    pending = [] if ledger.released(CLASS_COUNTS_LABEL) is not None else [counts_schedule.entry()]
    refuse_past_budget(ledger, schedule, run, f"round {server_round}", released_first=pending)
    device = torch.device(device)
    features = frozen_features(model, images, device=device, precision=precision)
    labels = torch.as_tensor(np.asarray(images.labels), dtype=torch.int64)
    noisy_counts = noisy_class_counts(ledger, images.labels, len(images.classes), counts_schedule, seed)
    logit_shift = torch.tensor(np.log(noisy_counts / noisy_counts.sum()), dtype=torch.float32)

    head = model.get_classifier()
    ratio = signal_to_noise(head, features, labels, logit_shift, schedule, privacy.max_grad_norm)
    if ratio * math.sqrt(schedule.steps * run.federation.rounds) < MOSTLY_NOISE:
        logger.warning(
            "%s: at epsilon %s this site's updates are mostly noise (measured signal-to-noise of a step %.2f: over "
            "the run's steps the expected noise norm is larger than the summed clipped gradients; %d images, noise "
            "multiplier %.2f, sampling rate %.3f, %d steps a round); they will add little: raise the epsilon, or pool "
            "more images at it",
            ledger.site, privacy.target_epsilon, ratio, len(images), schedule.noise_multiplier, schedule.sample_rate, schedule.steps,
        )
    head.to(device).train()
    criterion = PerSampleLoss("balanced-softmax", label_smoothing=0.0, focal_gamma=0.0, weight=None, logit_shift=logit_shift).to(device)
    optimizer = torch.optim.SGD(head.parameters(), lr=privacy.head_learning_rate, momentum=privacy.head_momentum)
    loader = DataLoader(
        TensorDataset(features, labels),
        batch_size=classifier_batch_size(len(images), run),
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    engine, (private_head, private_optimizer, private_loader) = make_private(
        head, optimizer, loader, schedule=schedule, run=run, mode="hooks", device=device, seed=seed, criterion=None
    )
    loss_sum, num_examples, step = 0.0, 0, 0
    started = time.perf_counter()
    try:
        with quiet_opacus():
            while step < schedule.steps:
                for batch_features, batch_labels in private_loader:
                    if step >= schedule.steps:
                        break
                    batch_features, batch_labels = batch_features.to(device), batch_labels.to(device)
                    private_optimizer.zero_grad(set_to_none=True)
                    loss = criterion(private_head(batch_features), batch_labels)
                    loss.backward()
                    private_optimizer.step()
                    step += 1
                    if len(batch_labels):
                        value = float(loss.detach())
                        if not math.isfinite(value):
                            raise ConfigError(f"{description}: the head's loss became {value} at step {step}; lower privacy.head_learning_rate")
                        loss_sum += value * len(batch_labels)
                        num_examples += len(batch_labels)
    finally:
        record_steps_taken(ledger, server_round, schedule, engine)
        private_head._close()
    seconds = time.perf_counter() - started
    return PrivateTrainResult(
        loss=loss_sum / max(num_examples, 1),
        num_examples=num_examples,
        steps=step,
        seconds=seconds,
        images_per_second=num_examples / seconds if seconds > 0 else float("inf"),
        epsilon=ledger.epsilon,
        epsilon_next_round=ledger.epsilon_after(schedule),
        delta=ledger.delta,
        noise_multiplier=schedule.noise_multiplier,
        sample_rate=schedule.sample_rate,
        grad_sample_mode="hooks",
        signal_to_noise=ratio,
    )
