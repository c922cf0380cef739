"""Tests of the datasets and loaders over cached images: balancing, seeding, caps, batch sizes."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from shared.config import PreprocessConfig
from shared.data.cache import CachedImages, build_image_cache
from shared.data.loading import ImageArrayDataset, balanced_sample_weights, make_eval_loader, make_train_loader
from shared.data.records import ImageTable
from shared.data.transforms import build_eval_transform, build_train_transform
from shared.errors import ConfigError, DataError

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
EVAL = build_eval_transform(MEAN, STD)


def _images(labels: list[int], *, size: int = 32, splits: list[str] | None = None) -> CachedImages:
    """In-memory cached images whose pixel values encode their row number."""
    count = len(labels)
    pixels = np.broadcast_to((np.arange(count) % 256).astype(np.uint8)[:, None, None, None], (count, size, size, 3))
    return CachedImages(
        images=np.ascontiguousarray(pixels),
        labels=np.asarray(labels, dtype=np.int64),
        image_ids=[f"img_{row}" for row in range(count)],
        splits=np.asarray(splits or ["train"] * count),
        classes=["mel", "nv"],
        source="site_a cache",
    )


def _drawn_labels(loader) -> list[int]:
    return [int(label) for _, labels in loader for label in labels]


def _drawn_rows(loader) -> list[int]:
    """Row numbers of the drawn images, read back from their normalised pixel values."""
    return [round((float(image[0, 0, 0]) * STD[0] + MEAN[0]) * 255) for batch, _ in loader for image in batch]


def test_dataset_returns_normalised_chw_tensor_and_int_label():
    dataset = ImageArrayDataset(_images([0, 1, 1]), EVAL)
    image, label = dataset[2]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert label == 1 and isinstance(label, int)
    assert torch.allclose(image, torch.full_like(image, (2 / 255 - 0.5) / 0.25))


def test_balanced_sample_weights_are_one_over_class_count():
    weights = balanced_sample_weights(np.array([0, 0, 0, 1]), 3)
    assert weights.dtype == torch.float64
    assert torch.allclose(weights, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0], dtype=torch.float64))


def test_balanced_sampler_draws_classes_about_equally_from_an_imbalanced_set():
    images = _images([0] * 180 + [1] * 20)
    loader = make_train_loader(images, batch_size=20, transform=EVAL, balance="sampler", seed=3)
    drawn = _drawn_labels(loader)
    assert len(drawn) == 200
    assert 0.35 <= np.mean(drawn) <= 0.65


def test_unbalanced_loader_visits_every_image_once_per_epoch():
    images = _images([0] * 18 + [1] * 2)
    loader = make_train_loader(images, batch_size=5, transform=EVAL, balance="none", seed=0)
    assert sorted(_drawn_rows(loader)) == list(range(20))


def test_train_loader_is_seeded():
    images = _images([0] * 30 + [1] * 10)
    orders = [
        _drawn_labels(make_train_loader(images, batch_size=8, transform=EVAL, balance="sampler", seed=seed))
        for seed in (1, 1, 2)
    ]
    assert orders[0] == orders[1] and orders[0] != orders[2]


def test_train_batches_have_the_transformed_shape():
    loader = make_train_loader(
        _images([0, 1] * 8), batch_size=4, transform=build_train_transform(MEAN, STD), balance="sampler", seed=0
    )
    batch, labels = next(iter(loader))
    assert batch.shape == (4, 3, 32, 32) and batch.dtype == torch.float32
    assert labels.shape == (4,) and labels.dtype == torch.int64


def test_max_steps_caps_an_epoch():
    images = _images([0, 1] * 50)
    for balance in ("sampler", "none"):
        loader = make_train_loader(images, batch_size=8, transform=EVAL, balance=balance, seed=0, max_steps=3)
        assert len(loader) == 3 and len(_drawn_labels(loader)) == 24
    uncapped = make_train_loader(images, batch_size=8, transform=EVAL, balance="sampler", seed=0, max_steps=100)
    assert len(_drawn_labels(uncapped)) == 100


@pytest.mark.parametrize("count,batches,drawn", [(33, 2, 32), (34, 3, 34), (32, 2, 32)])
def test_only_a_last_batch_of_one_is_dropped(count, batches, drawn):
    images = _images([0, 1] * (count // 2) + [0] * (count % 2))
    loader = make_train_loader(images, batch_size=16, transform=EVAL, balance="none", seed=0)
    assert len(loader) == batches and len(_drawn_labels(loader)) == drawn


def test_eval_loader_keeps_order_and_every_image():
    images = _images([0, 1, 1] * 11)
    loader = make_eval_loader(images, batch_size=16, transform=EVAL)
    assert len(loader) == 3
    assert _drawn_rows(loader) == list(range(33))
    assert _drawn_labels(loader) == list(images.labels)


def test_empty_split_names_the_site_split_and_the_fix():
    images = _images([0, 1, 0, 1], splits=["train", "train", "test", "test"])
    with pytest.raises(DataError, match=r"site_a cache \[val\]: no training images.*split fractions"):
        make_train_loader(images.select("val"), batch_size=4, transform=EVAL, balance="sampler", seed=0)
    with pytest.raises(DataError, match=r"site_a cache \[val\]: no images to evaluate on"):
        make_eval_loader(images.select("val"), batch_size=4, transform=EVAL)


def test_single_training_image_is_an_error():
    with pytest.raises(DataError, match="single training image"):
        make_train_loader(_images([1]), batch_size=4, transform=EVAL, balance="none", seed=0)


def test_unknown_balance_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="'oversample' is not one of"):
        make_train_loader(_images([0, 1]), batch_size=2, transform=EVAL, balance="oversample", seed=0)


def test_loader_workers_read_a_memory_mapped_cache(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for number in range(12):
        path = tmp_path / f"img_{number}.png"
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(path)
        label = ["mel", "nv"][number % 2]
        rows.append({"image_id": f"img_{number}", "path": str(path), "label": label, "group": str(number), "site": ""})
    table = ImageTable(frame=pd.DataFrame(rows), classes=["mel", "nv"], format="folder", root=tmp_path)
    cached = build_image_cache(table, tmp_path / "cache", PreprocessConfig(image_size=32), progress=False)
    loader = make_train_loader(
        cached, batch_size=4, transform=build_train_transform(MEAN, STD), balance="sampler", seed=0, num_workers=2
    )
    batches = list(loader)
    assert len(batches) == 3 and all(batch.shape == (4, 3, 32, 32) for batch, _ in batches)
