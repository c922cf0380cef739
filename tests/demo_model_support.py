"""A classifier trained briefly on a small generated demo dataset, shared by explanation and report tests."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from shared.config import ModelConfig, PreprocessConfig, TrainConfig
from shared.data.cache import CachedImages
from shared.data.demo import write_demo_dataset
from shared.data.readers import read_dataset
from shared.local_training import seed_everything, train_on_images
from shared.models.classifier import build_classifier, save_classifier
from shared.precision import resolve_precision
from shared.site_data import prepare_site_images

IMAGE_SIZE = 96
CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


@dataclass
class DemoModel:
    """A saved trained model, the demo folder it learned from, and that folder's cached images."""

    model_path: Path
    data_folder: Path
    images: CachedImages
    cache_root: Path


def train_demo_model(root: Path, *, epochs: int = 4, num_images: int = 140, seed: int = 0) -> DemoModel:
    """Fine-tune the packaged-weights lite0 on a generated folder dataset at 96 px for a few epochs (seconds)."""
    seed_everything(seed)
    data_folder = write_demo_dataset(root / "demo", format="folder", num_images=num_images, seed=seed)
    table = read_dataset(data_folder, "folder")
    preprocess = PreprocessConfig(image_size=IMAGE_SIZE)
    images = prepare_site_images(
        table, site="demo", classes=CLASSES, split_fractions=(0.7, 0.15, 0.15), seed=seed,
        cache_root=root / "cache", preprocess=preprocess, progress=False,
    )
    model = build_classifier(ModelConfig(name="tf_efficientnet_lite0", pretrained="default"), num_classes=len(CLASSES))
    config = TrainConfig(batch_size=16, local_epochs=epochs, amp="off", device="cpu", progress=False, learning_rate=2e-3)
    precision = resolve_precision("off", torch.device("cpu"))
    train_on_images(
        model, images.select("train"), config=config, device=torch.device("cpu"), precision=precision,
        learning_rate_start=2e-3, learning_rate_end=1e-4, seed=seed,
    )
    model_path = save_classifier(
        root / "model.pt", model.eval(), model_name="tf_efficientnet_lite0", classes=CLASSES, preprocess=preprocess
    )
    return DemoModel(model_path, data_folder, images, root / "cache")


@lru_cache(maxsize=1)
def shared_demo_model() -> DemoModel:
    """One trained demo model per test process (trained on first use, in a temporary folder)."""
    return train_demo_model(Path(tempfile.mkdtemp(prefix="skin-fl-demo-model-")))
