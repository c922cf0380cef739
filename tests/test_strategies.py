"""Server strategies on constructed site replies: hand-derived aggregates, and checkpoints equal to them."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import nn

from fake_grid import site_reply, use_plain_messages
from server.checkpoint import CheckpointWriter
from server.history import MetricHistory
from server.strategy import build_strategy
from shared.aggregation import ServerOptimiser, weighted_average
from shared.config import FederationConfig, RunConfig
from shared.errors import ConfigError
from shared.weights import model_to_arrays


class TinyNet(nn.Module):
    """One linear layer and one BatchNorm: weights to step, statistics to average."""

    pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.norm = nn.BatchNorm1d(2)


def _arrays(value: float, variance: float) -> dict[str, np.ndarray]:
    arrays = model_to_arrays(TinyNet())
    return {
        name: np.full_like(array, variance if name.endswith("running_var") else value) for name, array in arrays.items()
    }


def _replies(strategy, updates: list[dict], examples: list[int]) -> list[SimpleNamespace]:
    replies = []
    for node, (update, count) in enumerate(zip(updates, examples), start=1):
        content = RecordDict(
            {
                "arrays": ArrayRecord({name: Array(value) for name, value in update.items()}),
                "metrics": MetricRecord({"num-examples": count, "train-loss": 1.0}),
                "site": ConfigRecord({"name": f"site-{node}"}),
            }
        )
        replies.append(site_reply(node, content))
    strategy._asked_nodes = {reply.metadata.src_node_id for reply in replies}
    return replies


def _strategy(tmp_path, strategy: str, **federation):
    run = RunConfig(classes=["a", "b"], federation=FederationConfig(strategy=strategy, min_sites=1, **federation))
    model = TinyNet()
    built = build_strategy(run, MetricHistory(tmp_path), CheckpointWriter(tmp_path, model, run))
    return built, model


def _round(strategy, start: dict, updates: list[dict], examples: list[int], server_round: int) -> dict:
    strategy._round_start_arrays = ArrayRecord({name: Array(value) for name, value in start.items()})
    strategy._phase_started = 0.0
    arrays, _ = strategy.aggregate_train(server_round, _replies(strategy, updates, examples))
    return {name: array.numpy() for name, array in arrays.items()}


def test_weighted_average_weighs_by_examples():
    averaged = weighted_average([{"w": np.array([1.0])}, {"w": np.array([4.0])}], [3, 1])
    assert averaged["w"] == pytest.approx([(3 * 1.0 + 4.0) / 4])


def test_fedavgm_keeps_a_velocity_across_rounds(tmp_path):
    strategy, _ = _strategy(tmp_path, "fedavgm", server_momentum=0.5)
    start = _arrays(1.0, 1.0)
    # Round 1: average 2.0 (examples 1:1 of 1.0 and 3.0), delta +1, velocity 1, new weight 2.0.
    first = _round(strategy, start, [_arrays(1.0, 2.0), _arrays(3.0, 4.0)], [1, 1], 1)
    assert first["linear.weight"] == pytest.approx(np.full((2, 2), 2.0))
    # BatchNorm statistics take the plain average, never a momentum step.
    assert first["norm.running_var"] == pytest.approx([3.0, 3.0])
    # Round 2: average 2.5, delta +0.5, velocity 0.5 * 1 + 0.5 = 1.0, new weight 3.0.
    second = _round(strategy, first, [_arrays(2.5, 1.0), _arrays(2.5, 1.0)], [1, 1], 2)
    assert second["linear.weight"] == pytest.approx(np.full((2, 2), 3.0))
    assert second["norm.running_var"] == pytest.approx([1.0, 1.0])


def test_a_resumed_fedavgm_run_continues_the_velocity_its_checkpoint_kept(tmp_path):
    strategy, model = _strategy(tmp_path, "fedavgm", server_momentum=0.5)
    start = _arrays(1.0, 1.0)
    first = _round(strategy, start, [_arrays(1.0, 2.0), _arrays(3.0, 4.0)], [1, 1], 1)
    assert (tmp_path / "checkpoints" / "server_optimiser_001.npz").is_file()
    # A new server process resuming after round 1: the velocity 1 comes back, so round 2 steps to 3.0 as above.
    resumed = build_strategy(strategy.run, MetricHistory(tmp_path), CheckpointWriter(tmp_path, model, strategy.run), round_offset=1)
    second = _round(resumed, first, [_arrays(2.5, 1.0), _arrays(2.5, 1.0)], [1, 1], 1)
    assert second["linear.weight"] == pytest.approx(np.full((2, 2), 3.0))
    assert (tmp_path / "checkpoints" / "server_optimiser_002.npz").is_file()


def test_fedadam_steps_weights_and_averages_statistics(tmp_path):
    strategy, _ = _strategy(tmp_path, "fedadam", server_learning_rate=0.1)
    start = _arrays(0.0, 1.0)
    stepped = _round(strategy, start, [_arrays(1.0, 3.0), _arrays(1.0, 5.0)], [2, 2], 1)
    # delta 1: m = 0.1, v = 0.01, step = 0.1 * 0.1 / (0.1 + 1e-3).
    assert stepped["linear.weight"] == pytest.approx(np.full((2, 2), 0.1 * 0.1 / (0.1 + 1e-3)), rel=1e-5)
    assert stepped["norm.running_var"] == pytest.approx([4.0, 4.0])
    assert stepped["norm.running_mean"] == pytest.approx([1.0, 1.0])


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "fedavgm"])
def test_round_checkpoint_equals_the_arrays_the_round_hands_on(tmp_path, name):
    strategy, _ = _strategy(tmp_path, name)
    start = _arrays(0.5, 1.0)
    produced = _round(strategy, start, [_arrays(1.0, 2.0), _arrays(2.0, 6.0)], [3, 1], 1)
    saved = torch.load(tmp_path / "checkpoints" / "round_001.pt", map_location="cpu", weights_only=True)["state_dict"]
    for key, value in produced.items():
        assert saved[key].numpy() == pytest.approx(value), key


def test_unknown_server_optimiser_names_the_choices():
    with pytest.raises(ConfigError, match="average"):
        ServerOptimiser("sgd")


def test_server_optimiser_state_round_trips():
    optimiser = ServerOptimiser("adam", learning_rate=0.1)
    optimiser.step({"w": np.zeros(2)}, {"w": np.ones(2)})
    restored = ServerOptimiser("adam", learning_rate=0.1)
    restored.load_state(optimiser.state())
    assert restored.step({"w": np.zeros(2)}, {"w": np.ones(2)})["w"] == pytest.approx(optimiser.step({"w": np.zeros(2)}, {"w": np.ones(2)})["w"])


class _FakeGrid:
    """Answers every query with the statistics and image counts it was given, per destination node."""

    def __init__(self, answers: dict[int, tuple[dict, int]]) -> None:
        self.answers = answers
        self.sent = []

    def send_and_receive(self, messages, timeout=None):
        self.sent.extend(messages)
        replies = []
        for message in messages:
            statistics, count = self.answers[message.metadata.dst_node_id]
            content = RecordDict(
                {
                    "statistics": ArrayRecord({name: Array(value) for name, value in statistics.items()}),
                    "metrics": MetricRecord({"num-examples": count}),
                }
            )
            replies.append(site_reply(message.metadata.dst_node_id, content))
        return replies


def test_batch_norm_recalibration_merges_the_sites_measurements(tmp_path, monkeypatch):
    from server.batch_norm_recalibration import recalibrate_batch_norm

    use_plain_messages(monkeypatch)
    run = RunConfig(classes=["a", "b"], federation=FederationConfig(batch_norm="recalibrate"))
    start = _arrays(0.5, 1.0)
    grid = _FakeGrid(
        {
            1: ({"norm.running_mean": np.array([0.0, 0.0]), "norm.running_var": np.array([1.0, 1.0])}, 1),
            2: ({"norm.running_mean": np.array([2.0, 2.0]), "norm.running_var": np.array([1.0, 1.0])}, 1),
        }
    )
    merged = recalibrate_batch_norm(grid, run, ArrayRecord({k: Array(v) for k, v in start.items()}), [1, 2], 3)
    assert {message.message_type for message in grid.sent} == {"query.batch_norm"}
    assert merged["norm.running_mean"].numpy() == pytest.approx([1.0, 1.0])
    # Law of total variance: within-site 1 plus between-site 1.
    assert merged["norm.running_var"].numpy() == pytest.approx([2.0, 2.0])
    assert merged["linear.weight"].numpy() == pytest.approx(start["linear.weight"])


def test_early_stopping_ends_the_run_once_validation_stops_improving(tmp_path):
    from flwr.app import ConfigRecord

    from server.run_stop import RunStopped

    strategy, _ = _strategy(tmp_path, "fedavg", early_stopping_patience=2)
    arrays = ArrayRecord({name: Array(value) for name, value in _arrays(1.0, 1.0).items()})
    for server_round, score in ((1, 0.5), (2, 0.6), (3, 0.55)):
        strategy.history.record_evaluate(server_round, {"val-balanced-accuracy": score}, {}, 1.0)
    # One round without improvement: round 4 goes ahead.
    strategy._stop_if_no_longer_improving(4, arrays)
    assert strategy.early_stop is None
    strategy.history.record_evaluate(4, {"val-balanced-accuracy": 0.58}, {}, 1.0)
    with pytest.raises(RunStopped, match="before round 5: 2 round") as stop:
        strategy.configure_train(5, arrays, ConfigRecord(), None)
    assert stop.value.completed_rounds == 4 and stop.value.arrays is arrays
    assert strategy.early_stop == {"before_round": 5, "rounds_without_improvement": 2}


def test_fedadam_second_step_uses_adam_bias_correction():
    optimiser = ServerOptimiser("adam", learning_rate=0.1)
    first = optimiser.step({"w": np.zeros(1)}, {"w": np.ones(1)})
    second = optimiser.step(first, {"w": first["w"] + 1.0})
    m, v = 0.9 * 0.1 + 0.1 * 1.0, 0.99 * 0.01 + 0.01 * 1.0
    rate = 0.1 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    assert second["w"] - first["w"] == pytest.approx([rate * m / (np.sqrt(v) + 1e-3)])
