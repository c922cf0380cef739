"""PyTorch datasets and loaders over cached images: class-balanced training, in-order evaluation."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, WeightedRandomSampler

from shared.class_balance import federation_balanced_weights, require_federation_counts
from shared.data.cache import CachedImages
from shared.errors import ConfigError, DataError

BALANCE_MODES = ("sampler", "global", "none")


class ImageArrayDataset(Dataset):
    """(transformed CHW float tensor, class index) pairs over a set of cached images."""

    def __init__(self, images: CachedImages, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pixels = self.images.images[index]
        if not pixels.flags.writeable:
            # torch refuses to share read-only memory (the cache's memory map); one image is cheap to copy.
            pixels = np.array(pixels)
        chw = torch.from_numpy(pixels).permute(2, 0, 1)
        return self.transform(chw), int(self.images.labels[index])


def balanced_sample_weights(labels: np.ndarray | list[int], num_classes: int) -> torch.Tensor:
    """Sampling weight of every sample: one over the number of samples of its class."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got {labels.min()}..{labels.max()}")
    counts = np.bincount(labels, minlength=num_classes)
    return torch.from_numpy(1.0 / counts[labels]).to(torch.float64)


def make_train_loader(
    images: CachedImages,
    *,
    batch_size: int,
    transform: Callable[[torch.Tensor], torch.Tensor],
    balance: str,
    seed: int,
    num_workers: int = 0,
    max_steps: int | None = None,
    exact_steps: int | None = None,
    federation_class_counts: list[int] | None = None,
    pass_samples: int | None = None,
) -> DataLoader:
    """Shuffled (or class-balanced, with replacement) training batches, seeded.

    `balance` 'sampler' balances the site's own classes; 'global' weighs every image by one over
    the federation's images of its class (`federation_class_counts`, see shared.class_balance).
    `pass_samples` sets the images of one pass (default: the site's image count). `max_steps`
    caps the batches of one pass; `exact_steps` gives exactly that many batches, reshuffling for
    further passes when the images run out (a fixed number of local steps).
    """
    if balance not in BALANCE_MODES:
        raise ConfigError(f"balance {balance!r} is not one of {list(BALANCE_MODES)}")
    where = images.source or "these training images"
    if len(images) == 0:
        raise DataError(
            f"{where}: no training images; add images to this site or change the split fractions "
            "so its training split gets some"
        )
    if len(images) == 1:
        raise DataError(
            f"{where}: a single training image, and a batch of one cannot be trained on (BatchNorm); "
            "add images to this site or change the split fractions"
        )
    pass_length = len(images) if pass_samples is None else max(2, int(pass_samples))
    num_samples = pass_length if max_steps is None else min(pass_length, max_steps * batch_size)
    if exact_steps is not None:
        num_samples = exact_steps * batch_size
    generator = torch.Generator().manual_seed(seed)
    if balance == "sampler":
        weights = balanced_sample_weights(images.labels, len(images.classes))
        sampler = WeightedRandomSampler(weights, num_samples=num_samples, replacement=True, generator=generator)
    elif balance == "global":
        weights = federation_balanced_weights(images.labels, require_federation_counts(federation_class_counts))
        sampler = WeightedRandomSampler(weights, num_samples=num_samples, replacement=True, generator=generator)
    else:
        sampler = RandomSampler(range(len(images)), num_samples=num_samples, generator=generator)
    return DataLoader(
        ImageArrayDataset(images, transform),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        # A final batch of one breaks BatchNorm in training; drop it only then, so nothing else is lost.
        drop_last=batch_size > 1 and num_samples % batch_size == 1,
        generator=generator,
    )


def make_eval_loader(
    images: CachedImages,
    *,
    batch_size: int,
    transform: Callable[[torch.Tensor], torch.Tensor],
    num_workers: int = 0,
) -> DataLoader:
    """All images in order, in batches, none dropped."""
    if len(images) == 0:
        raise DataError(
            f"{images.source or 'these evaluation images'}: no images to evaluate on; "
            "add images to this site or change the split fractions so every split gets some"
        )
    return DataLoader(
        ImageArrayDataset(images, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
