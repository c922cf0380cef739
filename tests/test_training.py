"""Tests of the local training and evaluation loops: schedule, losses, steps, FedProx, prediction."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shared.config import TrainConfig
from shared.errors import ConfigError
from shared.precision import Precision
from shared.training import FocalLoss, cosine_learning_rate, evaluate, make_loss, predict, train_epochs

CPU = torch.device("cpu")
FP32 = Precision(None, False, "cpu")


def _separable_loader(num_examples: int = 64, batch_size: int = 8, seed: int = 0) -> DataLoader:
    """Two classes of tiny 3x2x2 'images' whose mean pixel value gives the class away."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_examples) % 2
    images = torch.randn(num_examples, 3, 2, 2, generator=generator) * 0.5 + (labels.float() * 2 - 1)[:, None, None, None]
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False)


def _linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 2))


def _config(**settings) -> TrainConfig:
    return TrainConfig(progress=False, grad_clip_norm=None, weight_decay=0.0, **settings)


def _train(model, loader, config, *, epochs=1, global_arrays=None, precision=FP32):
    return train_epochs(
        model,
        loader,
        config=config,
        device=CPU,
        precision=precision,
        learning_rate_start=config.learning_rate,
        learning_rate_end=config.learning_rate * config.min_learning_rate_ratio,
        epochs=epochs,
        class_counts=np.array([32, 32]),
        global_arrays=global_arrays,
    )


def test_cosine_schedule_endpoints_and_midpoint():
    assert cosine_learning_rate(1e-3, 0.05, 0.0) == pytest.approx(1e-3)
    assert cosine_learning_rate(1e-3, 0.05, 1.0) == pytest.approx(5e-5)
    assert cosine_learning_rate(1e-3, 0.05, 0.5) == pytest.approx((1e-3 + 5e-5) / 2)
    with pytest.raises(ValueError, match=r"progress 1.5 must lie in \[0, 1\]"):
        cosine_learning_rate(1e-3, 0.05, 1.5)


def test_weighted_cross_entropy_matches_a_hand_computation():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.5, 1.5, 0.0]])
    targets = torch.tensor([0, 1, 1])
    loss = make_loss(TrainConfig(loss="weighted-ce"), np.array([3, 1, 0]))

    # Inverse frequencies 1/3, 1, 0 scaled to mean 1 over the three classes: 0.75, 2.25, 0.
    np.testing.assert_allclose(loss.weight.numpy(), [0.75, 2.25, 0.0])
    log_probabilities = torch.log_softmax(logits, dim=1).numpy()
    weights = np.array([0.75, 2.25, 2.25])
    expected = -(weights * log_probabilities[[0, 1, 2], [0, 1, 1]]).sum() / weights.sum()
    assert loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_focal_loss_matches_a_hand_computation_and_reduces_to_cross_entropy():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    targets = torch.tensor([0, 2])
    probabilities = torch.softmax(logits, dim=1).numpy()[[0, 1], [0, 2]]
    expected = np.mean(-((1 - probabilities) ** 2) * np.log(probabilities))

    focal = make_loss(TrainConfig(loss="focal", focal_gamma=2.0), np.array([1, 1, 1]))
    assert isinstance(focal, FocalLoss)
    assert focal(logits, targets).item() == pytest.approx(expected, rel=1e-6)
    assert FocalLoss(gamma=0.0)(logits, targets).item() == pytest.approx(nn.functional.cross_entropy(logits, targets).item())


def test_training_reduces_the_loss_on_a_separable_problem():
    loader = _separable_loader()
    model = _linear_model()
    before = evaluate(model, loader, device=CPU, precision=FP32, classes=["a", "b"])["loss"]

    result = _train(model, loader, _config(learning_rate=0.05), epochs=3)

    after = evaluate(model, loader, device=CPU, precision=FP32, classes=["a", "b"])
    assert after["loss"] < before / 2
    assert after["accuracy"] == 1.0
    assert (result.steps, result.num_examples) == (24, 192)
    assert math.isfinite(result.loss) and result.images_per_second > 0


def test_training_with_a_grad_scaler_unscales_and_clips():
    model = _linear_model()
    config = TrainConfig(progress=False, grad_clip_norm=0.5, learning_rate=0.05)
    result = _train(model, _separable_loader(), config, precision=Precision(torch.bfloat16, True, "cpu"))
    assert math.isfinite(result.loss)


def test_fedprox_term_keeps_the_weights_near_the_global_ones():
    loader = _separable_loader()
    global_model = _linear_model()
    global_arrays = {name: tensor.detach().clone() for name, tensor in global_model.state_dict().items()}

    def distance_after_training(mu: float) -> float:
        model = _linear_model()
        _train(model, loader, _config(learning_rate=0.05, proximal_mu=mu), epochs=2, global_arrays=global_arrays)
        return sum((parameter - global_arrays[name]).pow(2).sum().item() for name, parameter in model.named_parameters())

    assert distance_after_training(50.0) < 0.2 * distance_after_training(0.0)


def test_steps_per_epoch_are_capped():
    result = _train(_linear_model(), _separable_loader(num_examples=80), _config(max_steps_per_epoch=3), epochs=2)
    assert (result.steps, result.num_examples) == (6, 48)


def test_a_non_finite_loss_stops_training_with_the_fix():
    images = torch.full((8, 3, 2, 2), float("nan"))
    loader = DataLoader(TensorDataset(images, torch.zeros(8, dtype=torch.int64)), batch_size=4)
    with pytest.raises(ConfigError, match="training loss became nan .*lower the learning rate or turn mixed precision off"):
        _train(_linear_model(), loader, _config())


def test_predict_gives_probabilities_and_labels_in_loader_order():
    loader = _separable_loader(num_examples=20, batch_size=6)
    probabilities, labels = predict(_linear_model(), loader, device=CPU, precision=FP32)

    assert probabilities.shape == (20, 2) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, np.arange(20) % 2)


def test_evaluate_reports_metrics_and_the_mean_cross_entropy():
    loader = _separable_loader(num_examples=20, batch_size=6)
    model = _linear_model()
    metrics = evaluate(model, loader, device=CPU, precision=FP32, classes=["a", "b"])

    images, labels = loader.dataset.tensors
    with torch.no_grad():
        expected_loss = nn.functional.cross_entropy(model(images), labels).item()
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert metrics["num_examples"] == 20
    assert set(metrics["per_class"]) == {"a", "b"}
    assert not model.training
