"""Shared by the web app tests: a small real classifier trained a few steps on demo lesions, and image files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shared.config import ModelConfig, PreprocessConfig
from shared.data.demo import render_lesion
from shared.data.transforms import NormaliseToFloat, preprocess_image
from shared.models.classifier import build_classifier, model_normalisation, save_classifier

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
IMAGE_SIZE = 64


def lesion_image(label: str, seed: int, width: int = 200, height: int = 150) -> Image.Image:
    """A procedural demo lesion of one class."""
    return render_lesion(label, np.random.default_rng(seed), width=width, height=height)


def image_bytes(image: Image.Image, format: str = "JPEG") -> bytes:
    """The image encoded as JPEG, PNG or another PIL format."""
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def train_tiny_model(path: Path, *, steps: int = 4, seed: int = 0, architecture: str = "resnet18") -> Path:
    """A randomly initialised timm model trained `steps` Adam steps on demo lesions at 64 px, saved like a run's model."""
    torch.manual_seed(seed)
    preprocess = PreprocessConfig(image_size=IMAGE_SIZE)
    model = build_classifier(ModelConfig(name=architecture, pretrained="none"), num_classes=len(CLASSES))
    normalise = NormaliseToFloat(*model_normalisation(model))
    labels = [index % len(CLASSES) for index in range(8)]
    pixels = [preprocess_image(lesion_image(CLASSES[label], seed * 100 + index), preprocess) for index, label in enumerate(labels)]
    inputs = torch.stack([normalise(torch.from_numpy(array).permute(2, 0, 1)) for array in pixels])
    targets = torch.tensor(labels)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return save_classifier(
        path, model.eval(), model_name=architecture, classes=CLASSES, preprocess=preprocess, metadata={"steps": steps}
    )
