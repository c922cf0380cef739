"""Train and evaluate a classifier on one set of cached images: what a site does in a round."""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from shared.class_balance import balanced_class_draws, require_federation_counts
from shared.config import TrainConfig
from shared.data.cache import CachedImages
from shared.data.loading import make_eval_loader, make_train_loader
from shared.data.transforms import build_eval_transform, build_train_transform
from shared.models.classifier import model_normalisation
from shared.precision import Precision, resolve_precision
from shared.training import TrainResult, evaluate, logits_and_labels, train_epochs


def precision_for(
    model: nn.Module, config: TrainConfig, device: torch.device, image_size: int, private: bool = False
) -> Precision:
    """The mixed-precision policy for this model, input size and device (never a GradScaler when `private`)."""
    return resolve_precision(
        config.amp,
        device,
        model=model,
        sample_shape=(3, image_size, image_size),
        batch_size=config.batch_size,
        private=private,
    )


def train_on_images(
    model: nn.Module,
    images: CachedImages,
    *,
    config: TrainConfig,
    device: torch.device,
    precision: Precision,
    learning_rate_start: float,
    learning_rate_end: float,
    seed: int,
    global_arrays: Mapping[str, torch.Tensor] | None = None,
    federation_class_counts: list[int] | None = None,
    description: str = "train",
) -> TrainResult:
    """Fine-tune `model` in place on the given (training) images for `config.local_steps` steps or `config.local_epochs` passes (or share of one).

    Under balance 'global' a pass draws the site's share of a balanced pass over the federation's
    images (`federation_class_counts`), not one per image of its own.
    """
    mean, std = model_normalisation(model)
    pass_samples = epoch_samples(images, config, federation_class_counts)
    loader = make_train_loader(
        images,
        batch_size=config.batch_size,
        transform=build_train_transform(mean, std, augment=config.augment),
        balance=config.balance,
        seed=seed,
        num_workers=config.num_workers,
        max_steps=config.max_steps_per_epoch,
        exact_steps=config.local_steps if config.local_steps is not None else config.steps_of_partial_epoch(pass_samples),
        federation_class_counts=federation_class_counts,
        pass_samples=pass_samples,
    )
    return train_epochs(
        model,
        loader,
        config=config,
        device=device,
        precision=precision,
        learning_rate_start=learning_rate_start,
        learning_rate_end=learning_rate_end,
        epochs=(config.whole_local_epochs() or 1) if config.local_steps is None else 1,
        class_counts=batch_class_counts(images, config, federation_class_counts),
        global_arrays=global_arrays,
        description=description,
    )


def batch_class_counts(images: CachedImages, config: TrainConfig, federation_class_counts: list[int] | None) -> np.ndarray:
    """Expected images per class of one local pass as drawn: what balanced softmax shifts the logits by.

    Uniform sampling draws the site's own counts; the class-balanced sampler draws every class the
    site holds equally often (so balanced softmax then only keeps the site from pushing down the
    classes it lacks: restricted softmax); balance 'global' draws the site's balanced share.
    """
    counts = images.class_counts()
    if config.balance == "sampler":
        present = counts > 0
        return np.where(present, counts.sum() / max(int(present.sum()), 1), 0.0)
    if config.balance == "global":
        return balanced_class_draws(counts, require_federation_counts(federation_class_counts))
    return counts


def epoch_samples(images: CachedImages, config: TrainConfig, federation_class_counts: list[int] | None) -> int:
    """Images of one local pass: the site's image count, or under balance 'global' its share of a balanced federation pass."""
    if config.balance != "global":
        return len(images)
    return max(2, round(float(batch_class_counts(images, config, federation_class_counts).sum())))


def logits_on_images(
    model: nn.Module, images: CachedImages, *, batch_size: int, device: torch.device, precision: Precision
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits and the labels of the given images (all of them, in order)."""
    mean, std = model_normalisation(model)
    loader = make_eval_loader(images, batch_size=batch_size, transform=build_eval_transform(mean, std))
    return logits_and_labels(model, loader, device=device, precision=precision)


def evaluate_on_images(
    model: nn.Module,
    images: CachedImages,
    *,
    batch_size: int,
    device: torch.device,
    precision: Precision,
    num_workers: int = 0,
) -> dict:
    """Metrics of `model` on the given images (all of them, in order)."""
    mean, std = model_normalisation(model)
    loader = make_eval_loader(
        images, batch_size=batch_size, transform=build_eval_transform(mean, std), num_workers=num_workers
    )
    return evaluate(model, loader, device=device, precision=precision, classes=images.classes)


def site_round_seed(run_seed: int, server_round: int, site: str) -> int:
    """The seed of one site's local training in one round: differs by run, round and site, same on every machine."""
    return run_seed * 100_003 + server_round * 1_009 + zlib.crc32(site.encode()) % 1_000


def seed_everything(seed: int) -> None:
    """Seed torch and numpy for a reproducible run on one process."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
