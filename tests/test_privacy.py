"""Differential privacy: settings validation, model preparation, per-sample gradients, accounting, budget stop."""

import json

import numpy as np
import pytest
import timm
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import nn

from server.aggregation import aggregate_site_metrics
from server.history import MetricHistory
from server.privacy_budget import LEDGER_KEY, PRIVACY_FILE, PrivacyBudget, PrivacyBudgetReached
from shared.config import PrivacyConfig, RunConfig, run_config_from_flower
from shared.data.cache import CachedImages
from shared.errors import ConfigError, ModelError
from shared.models.classifier import load_classifier, save_classifier
from shared.precision import Precision
from shared.privacy.accounting import (
    PrivacyBudgetExceeded,
    PrivacyLedger,
    RoundSchedule,
    epsilon_of,
    noise_multiplier_for,
)
from shared.privacy.model_preparation import (
    grad_sample_mode_for,
    is_prepared_for_privacy,
    prepare_for_private_training,
)
from shared.privacy.training import check_private_precision, train_privately

LOCAL = {"mode": "local", "target_epsilon": 3.0, "target_delta": 1e-4, "max_grad_norm": 1.0}
CLASSES = ["mel", "nv", "bcc"]


def _run(**privacy) -> RunConfig:
    return RunConfig(
        classes=CLASSES,
        model={"name": "resnet18", "pretrained": "none"},
        train={"batch_size": 4, "balance": "none", "augment": False, "progress": False, "max_steps_per_epoch": 2},
        federation={"rounds": 3},
        privacy={**LOCAL, **privacy},
    )


def _images(count: int = 12, size: int = 32) -> CachedImages:
    rng = np.random.default_rng(0)
    return CachedImages(
        images=rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8),
        labels=np.arange(count) % len(CLASSES),
        image_ids=[f"img_{row}" for row in range(count)],
        splits=np.asarray(["train"] * count),
        classes=CLASSES,
        source="site_a cache",
    )


# --- settings ---------------------------------------------------------------------------------


def test_privacy_is_off_by_default_and_settings_without_a_mode_are_an_error():
    assert RunConfig().privacy.mode == "off"
    with pytest.raises(ValueError, match="privacy.mode is 'off'.*set privacy.mode to 'local'"):
        PrivacyConfig(target_epsilon=3.0)


def test_partly_configured_local_privacy_names_what_is_missing():
    with pytest.raises(ValueError, match=r"partly configured: \['target_delta', 'max_grad_norm'\]"):
        PrivacyConfig(mode="local", target_epsilon=3.0)
    with pytest.raises(ValueError, match="target_epsilon \\(or noise_multiplier\\)"):
        PrivacyConfig(mode="local", target_delta=1e-5, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="central differential privacy needs noise_multiplier and max_grad_norm"):
        PrivacyConfig(mode="central", noise_multiplier=1.0)
    with pytest.raises(ValueError, match="apply to local DP-SGD only"):
        PrivacyConfig(mode="central", noise_multiplier=1.0, max_grad_norm=1.0, target_epsilon=3.0)


def test_privacy_contradicting_the_run_is_an_error_with_the_fix():
    with pytest.raises(ValueError, match="set train.balance 'none'"):
        RunConfig(privacy=LOCAL)
    with pytest.raises(ValueError, match="use strategy fedavg or fedadam"):
        RunConfig(privacy=LOCAL, train={"balance": "none"}, federation={"strategy": "fedprox"})
    with pytest.raises(ValueError, match="GAN phase trains on site images outside the DP-SGD budget"):
        RunConfig(privacy=LOCAL, train={"balance": "none"}, gan={"rounds": 2})


def test_flower_run_config_keys_carry_the_privacy_settings_and_zero_means_unset():
    run = run_config_from_flower(
        {
            "balance": "none",
            "privacy-mode": "local",
            "privacy-target-epsilon": 8.0,
            "privacy-target-delta": 1e-5,
            "privacy-noise-multiplier": 0,
            "privacy-max-grad-norm": 1.5,
            "privacy-poisson-sampling": True,
            "privacy-grad-sample-mode": "functorch",
        }
    )
    assert run.privacy.local and run.privacy.noise_multiplier is None and run.privacy.max_grad_norm == 1.5
    with pytest.raises(ConfigError, match="partly configured"):
        run_config_from_flower({"balance": "none", "privacy-mode": "local", "privacy-target-epsilon": 8.0})


# --- model preparation ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18", "efficientnet_b0"])
def test_every_offered_architecture_is_prepared_without_batch_norm_or_in_place_ops(name):
    model = prepare_for_private_training(timm.create_model(name, pretrained=False, num_classes=3))
    assert is_prepared_for_privacy(model)
    assert not any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())
    assert not any(getattr(module, "inplace", False) for module in model.modules())
    output = model(torch.randn(2, 3, 32, 32))
    assert output.shape == (2, 3) and torch.isfinite(output).all()
    assert grad_sample_mode_for(name) in ("hooks", "functorch", "ghost")


def test_group_norm_keeps_the_pretrained_scale_and_shift():
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    with torch.no_grad():
        model.bn1.weight.fill_(0.5)
        model.bn1.bias.fill_(0.25)
    prepare_for_private_training(model)
    assert isinstance(model.bn1, nn.GroupNorm)
    assert torch.all(model.bn1.weight == 0.5) and torch.all(model.bn1.bias == 0.25)


def test_a_saved_private_model_loads_with_its_group_norm_layers(tmp_path):
    model = prepare_for_private_training(timm.create_model("resnet18", pretrained=False, num_classes=3))
    path = save_classifier(
        tmp_path / "model.pt", model, model_name="resnet18", classes=CLASSES, preprocess=RunConfig().preprocess
    )
    loaded, saved = load_classifier(path)
    assert is_prepared_for_privacy(loaded) and saved.metadata["prepared_for_dp"] is True
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor)


def test_per_sample_gradients_of_the_default_model_match_one_backward_per_image():
    """The mode chosen for the default model computes exact per-sample gradients (GroupNormAct included)."""
    from opacus.grad_sample import wrap_model

    torch.manual_seed(0)
    model = prepare_for_private_training(timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3))
    model.train()
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    expected = []
    for row in range(3):
        model.zero_grad()
        nn.functional.cross_entropy(model(images[row : row + 1]), labels[row : row + 1]).backward()
        expected.append({name: p.grad.clone() for name, p in model.named_parameters()})
    model.zero_grad()
    wrapped = wrap_model(model, grad_sample_mode=grad_sample_mode_for("tf_efficientnet_lite0"), batch_first=True, loss_reduction="sum")
    nn.functional.cross_entropy(wrapped(images), labels, reduction="sum").backward()
    checked = 0
    for name, parameter in model.named_parameters():
        for row in range(3):
            difference = (parameter.grad_sample[row] - expected[row][name]).norm()
            assert difference <= 1e-3 * expected[row][name].norm() + 1e-5, name
        checked += 1
    assert checked == len(list(model.parameters()))
    wrapped._close()


# --- accounting -------------------------------------------------------------------------------


def test_calibrated_noise_spends_the_target_epsilon_over_the_whole_run_not_one_round():
    run = _run()
    schedule = RoundSchedule.for_site(run, train_size=12)
    assert schedule.steps == 2 and schedule.run_steps == 6 and schedule.sample_rate == pytest.approx(1 / 3)
    whole_run = epsilon_of([schedule.entry()] * run.federation.rounds, 1e-4)
    assert 3.0 - 0.02 <= whole_run <= 3.0
    assert epsilon_of([schedule.entry()], 1e-4) < whole_run
    assert noise_multiplier_for(PrivacyConfig(**{**LOCAL, "noise_multiplier": 2.0}), 0.1, 10) == 2.0


def test_the_ledger_survives_a_restart_and_refuses_another_delta(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, "site a/1", "run-1", 1e-4)
    first = ledger.record(1, 1.1, 0.25, 4)
    reopened = PrivacyLedger.open(tmp_path, "site a/1", "run-1", 1e-4)
    assert reopened.history == [(1.1, 0.25, 4)] and reopened.epsilon == pytest.approx(first)
    assert PrivacyLedger.open(tmp_path, "site a/1", "run-2", 1e-4).history == []
    with pytest.raises(ConfigError, match="keep target_delta unchanged"):
        PrivacyLedger.open(tmp_path, "site a/1", "run-1", 1e-5)


def test_a_grad_scaler_or_fp16_is_refused_under_dp():
    with pytest.raises(ConfigError, match="GradScaler"):
        check_private_precision(Precision(torch.float16, True, "cuda"))
    with pytest.raises(ConfigError, match="fp16"):
        check_private_precision(Precision(torch.float16, False, "cuda"))
    check_private_precision(Precision(torch.bfloat16, False, "cpu"))


def test_private_training_needs_a_prepared_model(tmp_path):
    run = _run()
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    ledger = PrivacyLedger.open(tmp_path, "a", "run", 1e-4)
    with pytest.raises(ModelError, match="prepare_for_private_training"):
        train_privately(
            model, _images(), run=run, ledger=ledger, server_round=1, device=torch.device("cpu"),
            precision=Precision(None, False, "cpu"), learning_rate_start=1e-3, learning_rate_end=1e-4, seed=0,
        )


def test_a_round_past_the_budget_is_refused_before_any_step(tmp_path):
    run = _run(noise_multiplier=0.5, target_epsilon=1.0)
    model = prepare_for_private_training(timm.create_model("resnet18", pretrained=False, num_classes=3))
    ledger = PrivacyLedger.open(tmp_path, "a", "run", 1e-4)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(PrivacyBudgetExceeded, match="past the budget 1.0"):
        train_privately(
            model, _images(), run=run, ledger=ledger, server_round=1, device=torch.device("cpu"),
            precision=Precision(None, False, "cpu"), learning_rate_start=1e-3, learning_rate_end=1e-4, seed=0,
        )
    assert ledger.history == [] and not ledger.path.exists()
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


# --- server side ------------------------------------------------------------------------------


def test_site_epsilons_aggregate_to_the_maximum():
    records = [
        RecordDict({"metrics": MetricRecord({"num-examples": 10, "epsilon": 1.0, "epsilon-next-round": 1.5, "train-loss": 1.0})}),
        RecordDict({"metrics": MetricRecord({"num-examples": 30, "epsilon": 2.0, "epsilon-next-round": 2.5, "train-loss": 2.0})}),
    ]
    aggregated = aggregate_site_metrics(records)
    assert aggregated["epsilon"] == 2.0 and aggregated["epsilon-next-round"] == 2.5
    assert aggregated["train-loss"] == pytest.approx(1.75)


def test_the_server_stops_before_a_round_that_would_pass_the_budget_and_a_resume_remembers(tmp_path):
    run = _run(noise_multiplier=1.0, target_epsilon=2.0)
    budget = PrivacyBudget(run, tmp_path)
    config = ConfigRecord()
    budget.before_train(1, ArrayRecord(), config)
    assert config[LEDGER_KEY] == tmp_path.name
    budget.sites = {
        "a": {"epsilon": 1.2, "epsilon_next_round": 1.8, "noise_multiplier": 1.0, "round": 1},
        "b": {"epsilon": 1.5, "epsilon_next_round": 2.1, "noise_multiplier": 1.0, "round": 1},
    }
    budget.save()
    resumed = PrivacyBudget(run, tmp_path)
    assert resumed.epsilon_spent == 1.5
    with pytest.raises(PrivacyBudgetReached, match="round 2 would take site b from epsilon 1.500 to 2.100") as stop:
        resumed.before_train(2, ArrayRecord(), ConfigRecord())
    assert stop.value.completed_rounds == 1
    saved = json.loads((tmp_path / PRIVACY_FILE).read_text())
    assert saved["stopped_early"]["before_round"] == 2 and saved["epsilon_spent_max"] == 1.5
    assert saved["settings"]["target_epsilon"] == 2.0


def test_the_budget_is_recovered_from_the_history_when_privacy_json_is_gone(tmp_path):
    history = MetricHistory(tmp_path)
    history.record_train(1, {}, {}, 1.0)
    history.rounds[1]["privacy"] = {
        "epsilon_max": 1.5,
        "epsilon_next_round_max": 2.1,
        "sites": {"b": {"epsilon": 1.5, "epsilon_next_round": 2.1, "noise_multiplier": 1.0, "round": 1}},
    }
    history.save()
    budget = PrivacyBudget(_run(noise_multiplier=1.0, target_epsilon=2.0), tmp_path)
    assert budget.epsilon_spent == 1.5 and budget.epsilon_next_round == 2.1


def test_central_privacy_wraps_the_recording_strategy_and_forwards_its_round_offset(tmp_path):
    from server.central_privacy import CentralPrivacyStrategy
    from server.checkpoint import CheckpointWriter
    from server.strategy import build_strategy

    run = RunConfig(classes=CLASSES, model={"name": "resnet18", "pretrained": "none"},
                    privacy={"mode": "central", "noise_multiplier": 0.5, "max_grad_norm": 2.0})
    model = prepare_for_private_training(timm.create_model("resnet18", pretrained=False, num_classes=3))
    strategy = build_strategy(run, MetricHistory(tmp_path), CheckpointWriter(tmp_path, model, run), num_sites=4)
    assert isinstance(strategy, CentralPrivacyStrategy)
    assert strategy.noise_multiplier == 0.5 and strategy.clipping_norm == 2.0 and strategy.num_sampled_clients == 4
    strategy.round_offset = 3
    assert strategy.strategy.round_offset == 3 and strategy.privacy_budget is strategy.strategy.privacy_budget
    assert json.loads((tmp_path / PRIVACY_FILE).read_text())["settings"]["mode"] == "central"
    plain = build_strategy(_run(), MetricHistory(tmp_path / "plain"), CheckpointWriter(tmp_path / "plain", model, run))
    assert not isinstance(plain, CentralPrivacyStrategy)
