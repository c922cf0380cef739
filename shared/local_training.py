"""Train and evaluate a classifier on one set of cached images: what a site does in a round."""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

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
    description: str = "train",
) -> TrainResult:
    """Fine-tune `model` in place on the given (training) images for `config.local_steps` steps or `config.local_epochs` passes (or share of one)."""
    mean, std = model_normalisation(model)
    loader = make_train_loader(
        images,
        batch_size=config.batch_size,
        transform=build_train_transform(mean, std, augment=config.augment),
        balance=config.balance,
        seed=seed,
        num_workers=config.num_workers,
        max_steps=config.max_steps_per_epoch,
        exact_steps=config.local_steps if config.local_steps is not None else config.steps_of_partial_epoch(len(images)),
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
        class_counts=images.class_counts(),
        global_arrays=global_arrays,
        description=description,
    )


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
