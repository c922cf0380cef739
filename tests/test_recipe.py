"""The training recipe's parts: balanced softmax, fixed local steps, BatchNorm statistics measured and merged."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shared.batch_norm import measure_batch_norm_statistics, merge_batch_norm_statistics
from shared.config import RunConfig, TrainConfig
from shared.data.cache import CachedImages
from shared.data.loading import make_train_loader
from shared.local_training import batch_class_counts
from shared.precision import Precision
from shared.privacy.training import PerSampleLoss
from shared.training import BalancedSoftmaxLoss, log_class_prior, make_loss

FP32 = Precision(None, False, "cpu")
LOCAL_DP = {"mode": "local", "target_epsilon": 8.0, "target_delta": 1e-5, "max_grad_norm": 1.0}
"""A complete local-DP setting, for the refusals of recipe options that DP-SGD's accounting excludes."""


def _images(count: int, size: int = 8, seed: int = 0) -> CachedImages:
    generator = np.random.default_rng(seed)
    return CachedImages(
        images=generator.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8),
        labels=np.arange(count) % 2,
        image_ids=[f"image-{index}" for index in range(count)],
        splits=np.asarray(["train"] * count),
        classes=["a", "b"],
    )


def test_balanced_softmax_is_cross_entropy_of_prior_shifted_logits():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    targets = torch.tensor([0, 2])
    counts = np.array([30, 10, 0])
    # The class without images counts as one: prior (30, 10, 1) / 41.
    shift = torch.log(torch.tensor([30.0, 10.0, 1.0]) / 41.0)
    expected = F.cross_entropy(logits + shift, targets)
    assert BalancedSoftmaxLoss(counts)(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(log_class_prior(counts), shift)


def test_balanced_softmax_is_chosen_by_name_and_shifts_by_the_classes_as_the_batches_draw_them():
    assert isinstance(make_loss(TrainConfig(loss="balanced-softmax", balance="none"), np.array([3, 1])), BalancedSoftmaxLoss)
    images = CachedImages(
        images=np.zeros((4, 8, 8, 3), dtype=np.uint8),
        labels=np.array([0, 0, 0, 1]),
        image_ids=[f"image-{index}" for index in range(4)],
        splits=np.asarray(["train"] * 4),
        classes=["a", "b", "c"],
    )
    assert batch_class_counts(images, TrainConfig(balance="none"), None).tolist() == [3, 1, 0]
    # The class-balanced sampler draws a and b equally and c never: only c is shifted (restricted softmax).
    assert batch_class_counts(images, TrainConfig(balance="sampler"), None).tolist() == [2.0, 2.0, 0.0]


def test_private_per_image_loss_shifts_logits_the_same_way():
    logits = torch.tensor([[1.0, -1.0], [0.0, 2.0]])
    targets = torch.tensor([1, 0])
    shift = log_class_prior(np.array([9, 1]))
    loss = PerSampleLoss("balanced-softmax", label_smoothing=0.0, focal_gamma=2.0, weight=None, logit_shift=shift)
    loss.reduction = "none"
    assert torch.allclose(loss(logits, targets), F.cross_entropy(logits + shift, targets, reduction="none"))


def test_local_steps_give_exactly_that_many_batches_past_one_pass():
    images = _images(10)
    loader = make_train_loader(images, batch_size=4, transform=lambda chw: chw.float(), balance="none", seed=0, exact_steps=7)
    batches = list(loader)
    assert len(batches) == 7
    assert all(len(labels) == 4 for _, labels in batches)


def test_local_steps_exclude_epochs_and_private_training():
    with pytest.raises(ValueError, match="local_steps fixes the steps"):
        TrainConfig(local_steps=10, local_epochs=2)
    with pytest.raises(ValueError, match="train.local_steps does not apply"):
        RunConfig(
            train={"local_steps": 10, "balance": "none"},
            privacy=LOCAL_DP,
        )


def test_a_share_of_an_epoch_runs_that_share_of_one_pass_and_whole_epochs_run_whole_passes():
    assert TrainConfig(local_epochs=0.25, batch_size=32).steps_of_partial_epoch(1000) == 8  # 32 batches a pass
    assert TrainConfig(local_epochs=0.01, batch_size=32).steps_of_partial_epoch(100) == 1
    assert TrainConfig(local_epochs=2).steps_of_partial_epoch(1000) is None
    assert TrainConfig(local_epochs=2).whole_local_epochs() == 2
    assert TrainConfig(local_epochs=0.5).whole_local_epochs() is None


def test_a_share_of_an_epoch_excludes_a_step_cap_and_private_training():
    with pytest.raises(ValueError, match="share of one pass"):
        TrainConfig(local_epochs=0.5, max_steps_per_epoch=3)
    with pytest.raises(ValueError, match="whole number of local epochs"):
        RunConfig(
            train={"local_epochs": 0.5, "balance": "none"},
            privacy=LOCAL_DP,
        )


class _Normalised(nn.Module):
    """BatchNorm straight on the input: its statistics are the images' own channel moments."""

    pretrained_cfg = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(images).mean(dim=(2, 3))


def test_measured_statistics_are_the_inputs_moments_and_leave_the_model_alone():
    model = _Normalised()
    model.norm.running_mean.fill_(7.0)
    images = _images(64, seed=1)
    measured = measure_batch_norm_statistics(model, images, batch_size=64, device=torch.device("cpu"), precision=FP32)
    pixels = torch.from_numpy(images.images).float().div(255.0).permute(0, 3, 1, 2)
    assert measured["norm.running_mean"] == pytest.approx(pixels.mean(dim=(0, 2, 3)).numpy(), abs=1e-5)
    assert measured["norm.running_var"] == pytest.approx(pixels.var(dim=(0, 2, 3)).numpy(), rel=1e-2)
    assert model.norm.running_mean.tolist() == [7.0, 7.0, 7.0]
    assert model.norm.momentum == 0.1


def test_merged_statistics_are_the_pooled_mean_and_variance():
    first, second = np.array([0.0, 1.0, 2.0]), np.array([10.0, 11.0, 12.0, 13.0, 14.0])
    sites = [
        {"layer.running_mean": np.array([first.mean()]), "layer.running_var": np.array([first.var()])},
        {"layer.running_mean": np.array([second.mean()]), "layer.running_var": np.array([second.var()])},
    ]
    merged = merge_batch_norm_statistics(sites, [len(first), len(second)])
    pooled = np.concatenate([first, second])
    assert merged["layer.running_mean"] == pytest.approx([pooled.mean()])
    assert merged["layer.running_var"] == pytest.approx([pooled.var()])



def test_batch_norm_recalibration_is_refused_under_local_privacy():
    with pytest.raises(ValueError, match="outside the DP-SGD accounting"):
        RunConfig(
            train={"balance": "none"},
            federation={"batch_norm": "recalibrate"},
            privacy=LOCAL_DP,
        )
