"""Differentiable augmentation of every image the discriminator sees (DiffAugment, Zhao et al. 2020).

A discriminator trained on a few hundred images memorises them and its gradients stop teaching
the generator. Random colour, translation and cutout applied alike to real and generated
images (and differentiable, so the generator learns through them) keep it from memorising
without the generator learning the augmentations. Images are float in [-1, 1], [N, 3, S, S].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

POLICIES = ("color", "translation", "cutout")
TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5


def _uniform(images: torch.Tensor, random: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(len(images), *shape, generator=random).to(images.device, images.dtype)


def random_colour(images: torch.Tensor, random: torch.Generator) -> torch.Tensor:
    """Per-image brightness shift in [-0.5, 0.5], saturation x [0, 2] and contrast x [0.5, 1.5]."""
    images = images + (_uniform(images, random, 1, 1, 1) - 0.5)
    grey = images.mean(dim=1, keepdim=True)
    images = (images - grey) * (_uniform(images, random, 1, 1, 1) * 2) + grey
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (images - mean) * (_uniform(images, random, 1, 1, 1) + 0.5) + mean


def random_translation(images: torch.Tensor, random: torch.Generator, ratio: float = TRANSLATION_RATIO) -> torch.Tensor:
    """Per-image shift by up to `ratio` of the side in each direction (whole pixels), zeros moved in."""
    size = images.shape[-1]
    limit = int(size * ratio + 0.5)
    shifts = (torch.randint(-limit, limit + 1, (len(images), 2), generator=random)).to(images.device)
    theta = torch.zeros(len(images), 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = -2.0 * shifts.to(images.dtype) / size
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def random_cutout(images: torch.Tensor, random: torch.Generator, ratio: float = CUTOUT_RATIO) -> torch.Tensor:
    """Per image one square of `ratio` of the side, at a random place (partly outside allowed), set to 0."""
    size = images.shape[-1]
    side = int(size * ratio + 0.5)
    corners = torch.randint(0, size + 1 - side % 2, (len(images), 2), generator=random).to(images.device) - side // 2
    positions = torch.arange(size, device=images.device)
    rows = (positions[None, :] >= corners[:, :1]) & (positions[None, :] < corners[:, :1] + side)
    columns = (positions[None, :] >= corners[:, 1:]) & (positions[None, :] < corners[:, 1:] + side)
    keep = ~(rows[:, :, None] & columns[:, None, :])
    return images * keep[:, None].to(images.dtype)


_OPERATIONS = {"color": random_colour, "translation": random_translation, "cutout": random_cutout}


def diff_augment(images: torch.Tensor, policies: Sequence[str], random: torch.Generator) -> torch.Tensor:
    """`images` through each named augmentation in turn, new random parameters per image."""
    for policy in policies:
        if policy not in _OPERATIONS:
            raise ValueError(f"unknown DiffAugment policy {policy!r}; choose from {', '.join(POLICIES)}")
        images = _OPERATIONS[policy](images, random)
    return images
