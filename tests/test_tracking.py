"""Per-round metrics as TensorBoard event files: what the server writes is what the history holds."""

import pytest

from server.history import MetricHistory
from server.tensorboard_log import TensorBoardLog
from tensorboard_events import read_scalars


def test_each_round_of_the_history_becomes_scalars_a_dashboard_reads(tmp_path):
    history = MetricHistory(tmp_path)
    log = TensorBoardLog(tmp_path)
    for server_round, balanced_accuracy in ((1, 0.25), (2, 0.5)):
        history.record_train(server_round, {"train-loss": 2.0 / server_round}, {"a": {"train-loss": 1.5}, "b": {}}, 3.0)
        history.record_evaluate(
            server_round,
            {"loss": 1.0, "balanced-accuracy": balanced_accuracy, "macro-auc": 0.75, "val-balanced-accuracy": 0.4},
            {"a": {"balanced-accuracy": 0.125}, "b": {"balanced-accuracy": 0.375}},
            1.5,
            missing=["c"],
        )
        log.write_round(history.rounds[server_round])
    log.close()
    scalars = read_scalars(tmp_path / "tensorboard")
    assert scalars["test/balanced_accuracy"] == {1: 0.25, 2: 0.5}
    assert scalars["train/loss"] == {1: 2.0, 2: 1.0}
    assert scalars["validation/balanced_accuracy"] == pytest.approx({1: 0.4, 2: 0.4})
    assert scalars["sites/evaluated"] == {1: 2.0, 2: 2.0} and scalars["round/seconds"] == {1: 4.5, 2: 4.5}
    assert scalars["site/a/balanced_accuracy"] == {1: 0.125, 2: 0.125} and scalars["site/a/train_loss"] == {1: 1.5, 2: 1.5}
    assert "test/melanoma_sensitivity" not in scalars  # a figure the round did not report is not invented
