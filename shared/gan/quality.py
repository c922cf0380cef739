"""GAN quality without hub weights: Fréchet distance in classifier features, train-synthetic/test-real, sample grids."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import linalg
from torch import nn

from shared.config import ModelConfig, TrainConfig
from shared.data.cache import CachedImages
from shared.errors import DataError
from shared.gan.training import generate, to_uint8_hwc

_GRID_PADDING = 2


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula, any feature space)."""
    if len(features_a) < 2 or len(features_b) < 2:
        raise DataError("the Fréchet distance needs at least 2 feature vectors on each side")
    mean_a, mean_b = features_a.mean(axis=0), features_b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(features_a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(features_b, rowvar=False))
    with warnings.catch_warnings():
        # A singular product (few samples, many features) is expected here and handled below.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():
        # Few samples in many dimensions make the product singular: the usual small diagonal offset.
        offset = np.eye(cov_a.shape[0]) * 1e-6
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    root = np.real(root)
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))


def per_class_frechet(
    real_features: np.ndarray, real_labels: np.ndarray, fake_features: np.ndarray, fake_labels: np.ndarray, classes: list[str]
) -> dict[str, float | None]:
    """Fréchet distance per class (None where either side has fewer than 2 images) and over all classes."""
    result: dict[str, float | None] = {}
    for index, name in enumerate(classes):
        real, fake = real_features[real_labels == index], fake_features[fake_labels == index]
        result[name] = frechet_distance(real, fake) if len(real) >= 2 and len(fake) >= 2 else None
    result["all"] = frechet_distance(real_features, fake_features)
    return result


def synthetic_cached_images(generator: nn.Module, labels: np.ndarray, classes: list[str], *, seed: int, image_size: int) -> CachedImages:
    """Generated images of the given classes as a training set at `image_size` (uint8, like a site cache)."""
    pixels = generate(generator, labels, seed=seed)
    if pixels.shape[-1] != image_size:
        pixels = nn.functional.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return CachedImages(
        images=to_uint8_hwc(pixels),
        labels=np.asarray(labels, dtype=np.int64),
        image_ids=[f"synthetic-{classes[label]}-{index:05d}" for index, label in enumerate(labels)],
        splits=np.asarray(["train"] * len(labels)),
        classes=list(classes),
        source="synthetic",
    )


def train_on_synthetic_test_on_real(
    generator: nn.Module,
    real_test: CachedImages,
    *,
    per_class: int,
    model_name: str,
    image_size: int,
    epochs: int = 2,
    seed: int = 0,
    train: TrainConfig | None = None,
) -> dict:
    """Train a fresh classifier only on `per_class` generated images of every class, then test on real images.

    Returns the real-test metrics (per-class recall, balanced accuracy) of `shared.metrics`.
    """
    from shared.local_training import evaluate_on_images, precision_for, seed_everything, train_on_images
    from shared.models.classifier import build_classifier

    classes = real_test.classes
    labels = np.repeat(np.arange(len(classes)), per_class)
    synthetic = synthetic_cached_images(generator, labels, classes, seed=seed, image_size=image_size)
    seed_everything(seed)
    model = build_classifier(ModelConfig(name=model_name, pretrained="none"), num_classes=len(classes))
    config = train or TrainConfig(batch_size=32, local_epochs=epochs, balance="none", progress=False)
    device = torch.device("cpu")
    precision = precision_for(model, config, device, image_size)
    train_on_images(
        model, synthetic, config=config, device=device, precision=precision,
        learning_rate_start=config.learning_rate, learning_rate_end=config.learning_rate * config.min_learning_rate_ratio,
        seed=seed, description="train-on-synthetic",
    )
    return evaluate_on_images(model, real_test, batch_size=64, device=device, precision=precision)


def save_class_grid(generator: nn.Module, classes: list[str], path: Path, *, per_class: int = 8, seed: int = 0) -> Path:
    """A PNG with one row of `per_class` generated images per class (fixed noise for a given seed)."""
    labels = np.repeat(np.arange(len(classes)), per_class)
    images = to_uint8_hwc(generate(generator, labels, seed=seed))
    side = images.shape[1]
    step = side + _GRID_PADDING
    canvas = np.full((len(classes) * step + _GRID_PADDING, per_class * step + _GRID_PADDING, 3), 255, dtype=np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, per_class)
        top, left = _GRID_PADDING + row * step, _GRID_PADDING + column * step
        canvas[top : top + side, left : left + side] = image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path
