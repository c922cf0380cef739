"""A site's personalised model: a fine-tuned copy of the global model, the global model left as it was."""

import numpy as np
import pytest
import torch
from torch import nn

from shared.config import RunConfig
from shared.data.cache import CachedImages
from shared.personalisation import personalise


class _TinyClassifier(nn.Module):
    """Mean colour per channel into a linear head: enough for an optimiser step to show."""

    pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(images.mean(dim=(2, 3)))


def _images(count: int) -> CachedImages:
    generator = np.random.default_rng(0)
    return CachedImages(
        images=generator.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8),
        labels=np.arange(count) % 2,
        image_ids=[f"image-{index}" for index in range(count)],
        splits=np.asarray(["train"] * count),
        classes=["a", "b"],
    )


def _run(epochs: float) -> RunConfig:
    return RunConfig(
        classes=["a", "b"],
        preprocess={"image_size": 32},
        train={"batch_size": 4, "amp": "off", "progress": False, "augment": False},
        report={"personalise_epochs": epochs, "personalise_learning_rate": 0.05},
    )


def test_personalised_copy_is_trained_and_the_global_model_is_left_unchanged():
    torch.manual_seed(0)
    model = _TinyClassifier()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    tuned = personalise(model, _images(16), _run(0.5), device=torch.device("cpu"), seed=3)
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in before.items())
    assert not torch.equal(tuned.head.weight, model.head.weight)
    assert not tuned.training


def test_personalising_needs_passes_and_training_images():
    with pytest.raises(ValueError, match="set report.personalise_epochs"):
        personalise(_TinyClassifier(), _images(4), _run(0.0), device=torch.device("cpu"), seed=0)
    with pytest.raises(ValueError, match="no training images"):
        personalise(_TinyClassifier(), _images(0), _run(1.0), device=torch.device("cpu"), seed=0)
