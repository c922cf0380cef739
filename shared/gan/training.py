"""Local conditional-GAN training on one site's images: hinge losses, separate D and G steps, AMP."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from shared.config import GanConfig
from shared.data.cache import CachedImages
from shared.errors import ConfigError, DataError
from shared.gan.diff_augment import diff_augment
from shared.precision import Precision, resolve_precision
from shared.progress import progress

FP32_CPU = Precision(None, False, "cpu")
_RESIZE_CHUNK = 256


@dataclass
class GanTrainResult:
    """What one call of `train_gan_locally` did."""

    discriminator_loss: float
    generator_loss: float
    steps: int
    num_examples: int
    seconds: float
    precision: str


def hinge_discriminator_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator, each image's own term relu(1 - D(real)) or relu(1 + D(fake)) averaged, x2.

    With as many real as fake images this is mean relu(1 - D(real)) + mean relu(1 + D(fake)).
    Written as one mean over all images so that a per-sample-gradient engine (Opacus, loss
    reduction 'mean') recovers each image's own gradient, whatever the batch's real/fake split.
    """
    terms = torch.cat([nn.functional.relu(1.0 - real_scores), nn.functional.relu(1.0 + fake_scores)])
    return 2.0 * terms.mean()


def hinge_generator_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the generator: minus the mean discriminator score of its images."""
    return -fake_scores.mean()


def _optimiser_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def discriminator_step(
    discriminator: nn.Module,
    optimizer: torch.optim.Optimizer,
    real_batch: tuple[torch.Tensor, torch.Tensor],
    fake_batch: tuple[torch.Tensor, torch.Tensor],
    *,
    precision: Precision = FP32_CPU,
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """One hinge-loss update of the discriminator on (images, labels) of real and generated images.

    Real and fake images go through the discriminator in one forward pass, so each image is one
    sample of one batch: a per-sample-gradient engine (Opacus DP-SGD) can wrap `discriminator`
    and `optimizer` unchanged (pass no `scaler` then).
    """
    real_images, real_labels = real_batch
    fake_images, fake_labels = fake_batch
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        scores = discriminator(torch.cat([real_images, fake_images.detach()]), torch.cat([real_labels, fake_labels]))
    scores = scores.float()
    loss = hinge_discriminator_loss(scores[: len(real_images)], scores[len(real_images):])
    _optimiser_step(loss, optimizer, scaler)
    return float(loss.detach())


def generator_step(
    generator: nn.Module,
    discriminator: nn.Module,
    optimizer: torch.optim.Optimizer,
    latent: torch.Tensor,
    labels: torch.Tensor,
    *,
    precision: Precision = FP32_CPU,
    scaler: torch.amp.GradScaler | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[float, torch.Tensor]:
    """One hinge-loss update of the generator; returns its loss and the (detached) images it made.

    `augment` (differentiable) transforms the images before the discriminator sees them, as it
    does the discriminator's own inputs.
    """
    optimizer.zero_grad(set_to_none=True)
    # The discriminator only passes gradients through; its weights get none (cheaper, and DP-safe).
    discriminator.requires_grad_(False)
    # Under DP-SGD it is an Opacus GradSampleModule, whose per-sample-gradient hooks must not fire here.
    per_sample_hooks = bool(getattr(discriminator, "hooks_enabled", False))
    if per_sample_hooks:
        discriminator.disable_hooks()
    try:
        with precision.autocast():
            fake_images = generator(latent, labels)
            scores = discriminator(fake_images if augment is None else augment(fake_images.float()), labels)
        loss = hinge_generator_loss(scores.float())
        _optimiser_step(loss, optimizer, scaler)
    finally:
        discriminator.requires_grad_(True)
        if per_sample_hooks:
            discriminator.enable_hooks()
    return float(loss.detach()), fake_images.detach()


def images_to_gan_tensor(images: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 [N, H, W, 3] images as uint8 [N, 3, S, S] at the GAN's side (antialiased resize)."""
    resized = []
    for start in range(0, len(images), _RESIZE_CHUNK):
        # A copy: cached images are a read-only memory map, which torch will not wrap.
        chunk = torch.from_numpy(np.array(images[start : start + _RESIZE_CHUNK])).permute(0, 3, 1, 2)
        if chunk.shape[-1] != image_size:
            chunk = nn.functional.interpolate(chunk.float(), size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
            chunk = chunk.round().clamp(0, 255).to(torch.uint8)
        resized.append(chunk)
    return torch.cat(resized)


def at_gan_resolution(images: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 [N, H, W, 3] images resized to the GAN's side, so real and generated images are compared alike."""
    return images_to_gan_tensor(images, image_size).permute(0, 2, 3, 1).contiguous().numpy()


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to float in [-1, 1], the generator's output range."""
    return images.float() / 127.5 - 1.0


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """Float images in [-1, 1] [N, 3, S, S] to uint8 [N, S, S, 3]."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def gan_precision(config: GanConfig, discriminator: nn.Module, device: torch.device, private: bool = False) -> Precision:
    """The project's mixed-precision policy applied to the discriminator at the GAN's image size (no GradScaler when `private`)."""
    return resolve_precision(
        config.amp, device, model=discriminator, sample_shape=(3, config.image_size, config.image_size),
        batch_size=config.batch_size, private=private,
    )


def flip_augment(batch: torch.Tensor, random: torch.Generator) -> torch.Tensor:
    """Each image flipped left-right and, independently, upside down with probability 1/2 (lesions have no up)."""
    flips = torch.rand(2, len(batch), generator=random)
    batch = torch.where(flips[0, :, None, None, None] < 0.5, batch.flip(3), batch)
    return torch.where(flips[1, :, None, None, None] < 0.5, batch.flip(2), batch)


def adversarial_step(
    generator: nn.Module,
    discriminator: nn.Module,
    optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
    real: tuple[torch.Tensor, torch.Tensor],
    fake_labels: tuple[torch.Tensor, torch.Tensor],
    *,
    random: torch.Generator,
    device: torch.device,
    precision: Precision,
    scalers: tuple[torch.amp.GradScaler | None, torch.amp.GradScaler | None] = (None, None),
    diff_augment_policies: Sequence[str] = (),
) -> tuple[float, float]:
    """One discriminator step on flipped real images (uint8) and fakes, then one generator step; their losses.

    `fake_labels` are the classes of the discriminator's fakes and of the generator step's images.
    With `diff_augment` policies every image the discriminator sees, real or generated, in both
    steps, goes through the same kind of differentiable augmentation (`shared.gan.diff_augment`).
    """
    real_images, real_labels = real
    augment = (lambda images: diff_augment(images, diff_augment_policies, random)) if diff_augment_policies else None
    batch = flip_augment(to_unit_range(real_images), random).to(device)
    d_labels, g_labels = (labels.to(device) for labels in fake_labels)
    latent = torch.randn(len(d_labels), generator.latent_dim, generator=random).to(device)
    with torch.no_grad(), precision.autocast():
        fakes = generator(latent, d_labels).float()
    if augment is not None:
        batch, fakes = augment(batch), augment(fakes)
    d_loss = discriminator_step(
        discriminator, optimizers[0], (batch, real_labels.to(device)), (fakes, d_labels), precision=precision, scaler=scalers[0]
    )
    latent = torch.randn(len(g_labels), generator.latent_dim, generator=random).to(device)
    g_loss, _ = generator_step(
        generator, discriminator, optimizers[1], latent, g_labels, precision=precision, scaler=scalers[1], augment=augment
    )
    return d_loss, g_loss


def gan_optimisers(generator: nn.Module, discriminator: nn.Module, config: GanConfig) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for the discriminator and the generator, betas (0, 0.9) as in SN-GAN."""
    betas = (0.0, 0.9)
    return (
        torch.optim.Adam(discriminator.parameters(), lr=config.discriminator_learning_rate, betas=betas),
        torch.optim.Adam(generator.parameters(), lr=config.generator_learning_rate, betas=betas),
    )


def check_gan_losses(d_loss: float, g_loss: float, step: int, precision: Precision) -> None:
    """Stop with the fix when a GAN loss became NaN or infinite."""
    if not (math.isfinite(d_loss) and math.isfinite(g_loss)):
        raise ConfigError(
            f"GAN losses became non-finite at local step {step + 1} (D {d_loss}, G {g_loss}, precision "
            f"{precision.name}); lower the GAN learning rates or turn GAN mixed precision off (gan amp off)"
        )


def train_gan_locally(
    generator: nn.Module,
    discriminator: nn.Module,
    images: CachedImages,
    *,
    config: GanConfig,
    device: torch.device,
    seed: int,
    precision: Precision | None = None,
) -> GanTrainResult:
    """Train both networks in place for `config.local_steps` alternating D and G steps on `images`.

    Real batches are drawn class-balanced (with replacement) unless `config.balanced_batches`
    is off, so the rare classes, which the GAN exists for, are seen as often as the common ones;
    random flips augment them. Fake images use the real batch's labels. (DP-SGD training of
    the discriminator is `shared.privacy.gan_training.train_gan_privately`.)
    """
    if len(images) < 2:
        raise DataError(f"{images.source or 'this site'}: the GAN needs at least 2 training images; add images to the site")
    device = torch.device(device)
    generator.to(device).train()
    discriminator.to(device).train()
    precision = precision or gan_precision(config, discriminator, device)
    real = images_to_gan_tensor(images.images, config.image_size)
    labels = torch.as_tensor(np.asarray(images.labels), dtype=torch.int64)
    counts = torch.bincount(labels, minlength=len(images.classes)).double()
    balanced = config.balanced_batches is not False
    weights = 1.0 / counts[labels] if balanced else torch.ones(len(labels), dtype=torch.float64)
    random = torch.Generator().manual_seed(seed)
    optimizers = gan_optimisers(generator, discriminator, config)
    scalers = tuple(torch.amp.GradScaler(device.type) if precision.use_grad_scaler else None for _ in range(2))
    d_total = g_total = 0.0
    started = time.perf_counter()
    with progress(config.local_steps, f"GAN steps {images.source or 'this site'}") as bar:
        for step in range(config.local_steps):
            rows = torch.multinomial(weights, config.batch_size, replacement=True, generator=random)
            d_loss, g_loss = adversarial_step(
                generator, discriminator, optimizers, (real[rows], labels[rows]), (labels[rows], labels[rows]),
                random=random, device=device, precision=precision, scalers=scalers, diff_augment_policies=config.diff_augment,
            )
            check_gan_losses(d_loss, g_loss, step, precision)
            d_total += d_loss
            g_total += g_loss
            bar.update(1)
            bar.set_postfix(d_loss=f"{d_total / (step + 1):.3f}", g_loss=f"{g_total / (step + 1):.3f}")
    seconds = time.perf_counter() - started
    steps = config.local_steps
    return GanTrainResult(d_total / steps, g_total / steps, steps, steps * config.batch_size, seconds, precision.name)


@torch.no_grad()
def generate(
    generator: nn.Module, labels: np.ndarray | list[int], *, seed: int, device: torch.device | str = "cpu", batch_size: int = 128
) -> torch.Tensor:
    """Images in [-1, 1] [N, 3, S, S] (on the CPU) for the given class indices, seeded."""
    generator.eval()
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    random = torch.Generator().manual_seed(seed)
    latent = torch.randn(len(labels), generator.latent_dim, generator=random)
    device = next(generator.parameters()).device
    outputs = [
        generator(latent[start : start + batch_size].to(device), labels[start : start + batch_size].to(device)).float().cpu()
        for start in range(0, len(labels), batch_size)
    ]
    return torch.cat(outputs) if outputs else torch.empty(0, 3, generator.image_size, generator.image_size)


@torch.no_grad()
def discriminator_scores(discriminator: nn.Module, images: torch.Tensor, labels: np.ndarray | list[int], batch_size: int = 128) -> np.ndarray:
    """Realism scores float [N] of images in [-1, 1] with their class indices."""
    discriminator.eval()
    device = next(discriminator.parameters()).device
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    scores = [
        discriminator(images[start : start + batch_size].to(device), labels[start : start + batch_size].to(device)).float().cpu()
        for start in range(0, len(images), batch_size)
    ]
    return torch.cat(scores).numpy() if scores else np.zeros(0, dtype=np.float32)
