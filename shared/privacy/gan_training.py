"""DP-SGD training of the GAN at a site: the discriminator under Opacus, the generator private by post-processing."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shared.config import RunConfig
from shared.data.cache import CachedImages
from shared.errors import ConfigError, DataError
from shared.gan.models import use_sigma_gradient
from shared.gan.training import GanTrainResult, adversarial_step, check_gan_losses, gan_optimisers, gan_precision, images_to_gan_tensor
from shared.precision import Precision
from shared.privacy.accounting import PrivacyLedger, RoundSchedule, gan_round_label
from shared.privacy.training import (
    PrivacyFigures,
    check_private_precision,
    make_private,
    quiet_opacus,
    record_steps_taken,
    refuse_past_budget,
)

DISCRIMINATOR_GRAD_SAMPLE_MODE = "hooks"
"""Per-sample-gradient mode of the discriminator (plain Conv2d/Linear/Embedding under its spectral norms).

Measured before this project's samplers, s per forward+backward, batch 64, channels 64, shared
2-core CPU (plain / functorch / hooks): 32 px 0.29 / 0.74 / 0.77, 64 px 1.59 / 6.75 / 5.26. With
them, a whole D+G step at batch 32 takes 1.51x (32 px) and 1.43x (64 px) the plain step.
"""


@dataclass
class PrivateGanTrainResult(GanTrainResult, PrivacyFigures):
    """A GAN round under DP-SGD: the training figures plus its noise, sampling and the epsilon the site has spent."""


def train_gan_privately(
    generator: nn.Module,
    discriminator: nn.Module,
    images: CachedImages,
    *,
    run: RunConfig,
    ledger: PrivacyLedger,
    server_round: int,
    device: torch.device,
    seed: int,
    precision: Precision | None = None,
) -> PrivateGanTrainResult:
    """One GAN round at a site with the discriminator trained by DP-SGD; both networks are updated in place.

    Only the discriminator sees real images: each step it gets a Poisson sample of them (rate
    `gan.batch_size` / site images, as the RDP accounting assumes), clipped per image and noised
    by Opacus. The generator learns only through the discriminator's output, so it and its images
    are differentially private by post-processing. For that to hold, nothing else about the
    real batch reaches either network: the fakes are a fixed `gan.batch_size` per step (their
    number must not reveal how many real images were sampled) and their classes are drawn
    uniformly, not copied from the real batch. The round is refused before any step when it would
    take the site past the run's epsilon; every step taken is recorded in the site's ledger.
    """
    privacy, config = run.privacy, run.gan
    if not privacy.local:
        raise ConfigError("train_gan_privately needs privacy.mode 'local'")
    if len(images) < 2:
        raise DataError(f"{images.source or 'this site'}: the GAN needs at least 2 training images; add images to the site")
    schedule = RoundSchedule.for_gan(run, len(images))
    refuse_past_budget(ledger, schedule, run, f"GAN round {server_round}")
    device = torch.device(device)
    generator.to(device).train()
    discriminator.to(device).train()
    precision = precision or gan_precision(config, discriminator, device, private=True)
    check_private_precision(precision)
    real = images_to_gan_tensor(images.images, config.image_size)
    labels = torch.as_tensor(np.asarray(images.labels), dtype=torch.int64)
    random = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(real, labels), batch_size=config.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed + 2))
    mode = privacy.grad_sample_mode if privacy.grad_sample_mode in ("hooks", "functorch") else DISCRIMINATOR_GRAD_SAMPLE_MODE
    d_optimizer, g_optimizer = gan_optimisers(generator, discriminator, config)
    use_sigma_gradient(discriminator, False)
    engine, (private_discriminator, private_d_optimizer, private_loader) = make_private(
        discriminator, d_optimizer, loader, schedule=schedule, run=run, mode=mode, device=device, seed=seed
    )
    num_classes = len(images.classes)
    d_total = g_total = 0.0
    step = 0
    started = time.perf_counter()
    try:
        with quiet_opacus():
            while step < config.local_steps:
                for real_images, real_labels in private_loader:
                    if step >= config.local_steps:
                        break
                    fake_labels = torch.randint(0, num_classes, (2, config.batch_size), generator=random)
                    d_loss, g_loss = adversarial_step(
                        generator, private_discriminator, (private_d_optimizer, g_optimizer), (real_images, real_labels),
                        (fake_labels[0], fake_labels[1]), random=random, device=device, precision=precision,
                        diff_augment_policies=config.diff_augment,
                    )
                    check_gan_losses(d_loss, g_loss, step, precision)
                    d_total += d_loss
                    g_total += g_loss
                    step += 1
    finally:
        # Every step taken was released in the weights this site may send: record them even on failure.
        record_steps_taken(ledger, gan_round_label(server_round), schedule, engine)
        private_discriminator._close()
        use_sigma_gradient(discriminator, True)
    seconds = time.perf_counter() - started
    return PrivateGanTrainResult(
        discriminator_loss=d_total / max(step, 1),
        generator_loss=g_total / max(step, 1),
        steps=step,
        num_examples=int(round(step * schedule.sample_rate * len(images))),
        seconds=seconds,
        precision=precision.name,
        epsilon=ledger.epsilon,
        epsilon_next_round=ledger.epsilon_after(schedule),
        delta=ledger.delta,
        noise_multiplier=schedule.noise_multiplier,
        sample_rate=schedule.sample_rate,
    )
