"""Temperature scaling and calibration error: grid likelihoods, the chosen temperature, folding, reliability bins."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from server.history import MetricHistory
from server.model_selection import best_validation_round
from shared.calibration import (
    TEMPERATURES,
    best_temperature,
    calibration_bins,
    fold_temperature,
    summed_negative_log_likelihoods,
)
from shared.errors import ModelError


def test_overconfident_logits_get_a_temperature_above_one():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (400,), generator=generator)
    # Right 70 % of the time, but with logits that claim near certainty.
    predicted = torch.where(torch.rand(400, generator=generator) < 0.7, labels, (labels + 1) % 3)
    logits = F.one_hot(predicted, 3).float() * 12.0
    chosen = best_temperature(summed_negative_log_likelihoods(logits, labels))
    assert chosen > 3.0
    # Summing sites' likelihoods is the pooled likelihood: two halves give the same choice.
    halves = summed_negative_log_likelihoods(logits[:200], labels[:200]) + summed_negative_log_likelihoods(logits[200:], labels[200:])
    assert best_temperature(halves) == chosen


def test_likelihoods_on_the_grid_match_cross_entropy():
    logits, labels = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    sums = summed_negative_log_likelihoods(logits, labels)
    index = int(np.argmin(np.abs(TEMPERATURES - 1.0)))
    assert TEMPERATURES[index] == pytest.approx(1.0)
    assert sums[index] == pytest.approx(F.cross_entropy(logits, labels, reduction="sum").item(), rel=1e-6)
    with pytest.raises(ModelError, match="same skin-fl version"):
        best_temperature(sums[:-1])


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Linear(4, 4)
        self.classifier = nn.Linear(4, 3)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.features(inputs)))


def test_folding_divides_the_logits_and_keeps_the_top_class():
    torch.manual_seed(0)
    model, inputs = _Head(), torch.randn(8, 4)
    before = model(inputs).detach()
    fold_temperature(model, 2.5)
    after = model(inputs).detach()
    assert torch.allclose(after, before / 2.5, atol=1e-6)
    assert torch.equal(after.argmax(dim=1), before.argmax(dim=1))
    with pytest.raises(ModelError, match="positive"):
        fold_temperature(model, 0.0)


def test_reliability_bins_and_expected_calibration_error_by_hand():
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    labels = np.array([0, 1, 0, 1])
    bins = calibration_bins(probabilities, labels, bins=10)
    # Two images at 0.9 (one right), two at 0.6 (both right): |1.8 - 1| + |1.2 - 2| over 4 images.
    assert bins["expected_calibration_error"] == pytest.approx((0.8 + 0.8) / 4)
    assert bins["counts"][8] == 2 and bins["counts"][5] == 2
    assert bins["accuracy"][8] == pytest.approx(0.5) and bins["accuracy"][5] == pytest.approx(1.0)
    assert bins["accuracy"][0] is None


def test_best_validation_round_takes_the_latest_best(tmp_path):
    history = MetricHistory(tmp_path)
    for server_round, score in ((1, 0.4), (2, 0.6), (3, 0.5), (4, 0.6)):
        history.record_evaluate(server_round, {"val-balanced-accuracy": score}, {}, 1.0)
    assert best_validation_round(history) == 4
    assert best_validation_round(MetricHistory(tmp_path / "empty")) is None
