"""Differential privacy: settings validation, model preparation, per-sample gradients, accounting, budget stop."""

import json

import pytest
import timm
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import nn

from server.aggregation import aggregate_site_metrics
from server.history import MetricHistory
from server.privacy_budget import LEDGER_KEY, PrivacyBudget, PrivacyBudgetReached
from shared.config import GanConfig, PrivacyConfig, RunConfig, run_config_from_flower
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
from shared.privacy.per_sample_gradients import install_fast_per_sample_gradients
from shared.privacy.training import check_private_precision, quiet_opacus, train_privately
from shared.run_folder import RunFolder
from site_images import random_site_images

LOCAL = {"mode": "local", "target_epsilon": 3.0, "target_delta": 1e-4, "max_grad_norm": 1.0}
CLASSES = ["mel", "nv", "bcc"]


def _run(**privacy) -> RunConfig:
    """A run of the fine-tune recipe (tests/test_private_head.py covers the linear-head default)."""
    return RunConfig(
        classes=CLASSES,
        model={"name": "resnet18", "pretrained": "none"},
        train={"batch_size": 4, "balance": "none", "augment": False, "progress": False, "max_steps_per_epoch": 2},
        federation={"rounds": 3},
        privacy={**LOCAL, "recipe": "fine-tune", **privacy},
    )


def _images(count: int = 12, size: int = 32) -> CachedImages:
    return random_site_images(CLASSES, count, size)


# --- settings ---------------------------------------------------------------------------------


def test_privacy_is_off_by_default_and_settings_without_a_mode_are_an_error():
    assert RunConfig().privacy.mode == "off"
    with pytest.raises(ValueError, match="privacy.mode is 'off'.*set privacy.mode to 'local'"):
        PrivacyConfig(target_epsilon=3.0)


def test_partly_configured_local_privacy_names_what_is_missing():
    with pytest.raises(ValueError, match=r"partly configured: \['target_delta', 'max_grad_norm'\]"):
        PrivacyConfig(mode="local", target_epsilon=3.0, recipe="fine-tune")
    with pytest.raises(ValueError, match="target_epsilon \\(or noise_multiplier\\)"):
        PrivacyConfig(mode="local", target_delta=1e-5, max_grad_norm=1.0)
    # The linear-head recipe (the default) has measured defaults: a budget alone is complete.
    budget_only = PrivacyConfig(mode="local", target_epsilon=8.0)
    assert (budget_only.recipe, budget_only.target_delta, budget_only.max_grad_norm) == ("linear-head", 1e-5, 20.0)
    assert PrivacyConfig(mode="local", target_epsilon=8.0, max_grad_norm=5.0).max_grad_norm == 5.0
    with pytest.raises(ValueError, match="central differential privacy needs noise_multiplier and max_grad_norm"):
        PrivacyConfig(mode="central", noise_multiplier=1.0)
    with pytest.raises(ValueError, match="apply to local DP-SGD only"):
        PrivacyConfig(mode="central", noise_multiplier=1.0, max_grad_norm=1.0, target_epsilon=3.0)


def test_privacy_contradicting_the_run_is_an_error_with_the_fix():
    with pytest.raises(ValueError, match="set train.balance 'none'"):
        RunConfig(privacy=LOCAL)
    with pytest.raises(ValueError, match="use strategy fedavg or fedadam"):
        RunConfig(privacy=LOCAL, train={"balance": "none"}, federation={"strategy": "fedprox"})
    assert RunConfig(privacy=LOCAL, train={"balance": "none"}, gan={"rounds": 2}).gan.rounds == 2
    with pytest.raises(ValueError, match="leave it unset \\(Poisson sampling under DP\\)"):
        RunConfig(privacy=LOCAL, train={"balance": "none"}, gan={"rounds": 2, "balanced_batches": True})
    with pytest.raises(ValueError, match="gan.augment selects synthetic images by comparing them with the site's real images"):
        RunConfig(privacy=LOCAL, train={"balance": "none"}, gan={"rounds": 2, "augment": True})


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
        run_config_from_flower(
            {"balance": "none", "privacy-mode": "local", "privacy-target-epsilon": 8.0, "privacy-recipe": "fine-tune"}
        )


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


@pytest.mark.parametrize("name,first_trained", [("tf_efficientnet_lite0", "classifier.weight"), ("resnet18", "fc.weight")])
def test_head_only_preparation_freezes_the_backbone_with_its_batch_norm_statistics(name, first_trained, tmp_path):
    from timm.layers.norm_act import FrozenBatchNorm2d, FrozenBatchNormAct2d

    model = timm.create_model(name, pretrained=False, num_classes=3)
    first_norm = next(module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm))
    with torch.no_grad():
        first_norm.running_mean.fill_(0.25)
    prepare_for_private_training(model, trainable_stages=0)
    trained = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trained == [first_trained, first_trained.replace("weight", "bias")]
    assert all(not parameter.any() for parameter in model.get_classifier().parameters())  # a linear probe starts at zero
    with torch.no_grad():
        model.get_classifier().weight.normal_()  # as after training, so the saved and loaded outputs differ from zero
    frozen_norms = [module for module in model.modules() if isinstance(module, (FrozenBatchNorm2d, FrozenBatchNormAct2d))]
    assert frozen_norms and torch.all(frozen_norms[0].running_mean == 0.25)
    assert not any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())
    with pytest.raises(ModelError, match="prepared for DP-SGD training 0 stages, not None"):
        prepare_for_private_training(model)
    path = save_classifier(tmp_path / "model.pt", model, model_name=name, classes=CLASSES, preprocess=RunConfig().preprocess)
    loaded, saved = load_classifier(path)
    assert saved.metadata["dp_trainable_stages"] == 0
    assert [name for name, parameter in loaded.named_parameters() if parameter.requires_grad] == trained
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded(images), model.eval()(images), atol=1e-5)


def test_one_trainable_stage_trains_the_last_stage_and_everything_after_it():
    model = prepare_for_private_training(timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3), trainable_stages=1)
    trained = {
        name.split(".")[0] + ("." + name.split(".")[1] if name.startswith("blocks") else "")
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }
    assert trained == {"blocks.5", "blocks.6", "conv_head", "bn2", "classifier"}


def test_trainable_stages_is_a_local_dp_setting_and_minus_one_means_every_layer():
    with pytest.raises(ValueError, match="privacy.mode is 'off'"):
        PrivacyConfig(trainable_stages=0)
    with pytest.raises(ValueError, match="apply to local DP-SGD only"):
        PrivacyConfig(mode="central", noise_multiplier=1.0, max_grad_norm=1.0, trainable_stages=1)
    flat = {"balance": "none", "privacy-mode": "local", "privacy-target-epsilon": 3.0, "privacy-target-delta": 1e-5, "privacy-max-grad-norm": 1.0}
    assert run_config_from_flower({**flat, "privacy-trainable-stages": -1}).privacy.trainable_stages is None
    assert run_config_from_flower({**flat, "privacy-trainable-stages": 0}).privacy.trainable_stages == 0


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


def _assert_exact_per_sample_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mode: str) -> None:
    """Per-sample gradients from Opacus (`mode`) equal one backward per image, for every parameter."""
    from opacus.grad_sample import wrap_model

    install_fast_per_sample_gradients()
    expected = []
    for row in range(len(images)):
        model.zero_grad()
        nn.functional.cross_entropy(model(images[row : row + 1]), labels[row : row + 1]).backward()
        expected.append({name: p.grad.clone() for name, p in model.named_parameters()})
    model.zero_grad()
    wrapped = wrap_model(model, grad_sample_mode=mode, batch_first=True, loss_reduction="sum")
    with quiet_opacus():
        nn.functional.cross_entropy(wrapped(images), labels, reduction="sum").backward()
    checked = 0
    for name, parameter in model.named_parameters():
        for row in range(len(images)):
            difference = (parameter.grad_sample[row] - expected[row][name]).norm()
            assert difference <= 1e-3 * expected[row][name].norm() + 1e-5, (name, mode)
        checked += 1
    assert checked == len(list(model.parameters()))
    wrapped._close()


@pytest.mark.slow  # full-size models, one backward per image: the longest unit checks (20-40 s each on a loaded 2-core machine)
@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18", "efficientnet_b0"])
def test_per_sample_gradients_of_every_offered_architecture_match_one_backward_per_image_in_channels_last(name):
    """Both modes, on channels-last images as training feeds them (Opacus's own hooks-mode convolution sampler fails there)."""
    torch.manual_seed(0)
    model = prepare_for_private_training(timm.create_model(name, pretrained=False, num_classes=3)).train()
    model = model.to(memory_format=torch.channels_last)
    images = torch.randn(3, 3, 40, 40).contiguous(memory_format=torch.channels_last)
    for mode in ("hooks", "functorch"):
        _assert_exact_per_sample_gradients(model, images, torch.tensor([0, 1, 2]), mode)
    assert grad_sample_mode_for(name) in ("hooks", "functorch")


@pytest.mark.parametrize("layer", [
    nn.Conv2d(4, 6, 1, stride=2, bias=True),
    nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6),
    nn.Conv2d(6, 6, 5, padding=4, dilation=2, groups=6, bias=True),
    nn.Conv2d(6, 6, 3, padding="same", groups=6),
    nn.Conv2d(4, 6, 3, stride=(2, 1), padding=(0, 2), groups=2, bias=True),
    nn.Conv2d(4, 6, (3, 2), padding="same", dilation=2),
], ids=["pointwise-stride", "depthwise-stride", "depthwise-dilated", "depthwise-same", "grouped", "same-dilated"])
def test_the_fast_convolution_samplers_are_exact_for_every_kernel_shape(layer):
    from timm.layers.conv2d_same import Conv2dSame

    torch.manual_seed(0)
    in_channels = layer.in_channels
    for conv in (layer, Conv2dSame(in_channels, layer.out_channels, 3, stride=2, groups=layer.groups, bias=layer.bias is not None)):
        model = nn.Sequential(nn.Conv2d(3, in_channels, 1), conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(layer.out_channels, 3))
        images = torch.randn(3, 3, 11, 11).contiguous(memory_format=torch.channels_last)
        _assert_exact_per_sample_gradients(model, images, torch.tensor([0, 1, 2]), "hooks")


# --- accounting -------------------------------------------------------------------------------


def test_calibrated_noise_spends_the_target_epsilon_over_the_whole_run_not_one_round():
    run = _run()
    schedule = RoundSchedule.for_site(run, train_size=12)
    assert schedule.steps == 2 and schedule.run_steps == 6 and schedule.sample_rate == pytest.approx(1 / 3)
    whole_run = epsilon_of([schedule.entry()] * run.federation.rounds, 1e-4)
    assert 3.0 - 0.02 <= whole_run <= 3.0
    assert epsilon_of([schedule.entry()], 1e-4) < whole_run
    assert noise_multiplier_for(PrivacyConfig(**{**LOCAL, "noise_multiplier": 2.0}), ((0.1, 10),)) == 2.0


def test_one_noise_multiplier_spends_the_budget_over_the_gan_and_the_classifier_phases():
    run = _run().model_copy(update={"gan": GanConfig(rounds=2, local_steps=5, batch_size=3)})
    gan_round, classifier_round = RoundSchedule.for_gan(run, 12), RoundSchedule.for_site(run, 12)
    assert gan_round.noise_multiplier == classifier_round.noise_multiplier > RoundSchedule.for_site(_run(), 12).noise_multiplier
    assert gan_round.sample_rate == pytest.approx(1 / 4) and gan_round.steps == 5 and gan_round.run_steps == 2 * 5 + 3 * 2
    whole_run = epsilon_of([gan_round.entry()] * 2 + [classifier_round.entry()] * 3, 1e-4)
    assert 3.0 - 0.02 <= whole_run <= 3.0
    with pytest.raises(ConfigError, match="over 10 steps at sampling rate 0.2500, 6 steps at sampling rate 0.3333"):
        noise_multiplier_for(PrivacyConfig(**{**LOCAL, "target_epsilon": 1e-6}), ((0.25, 10), (1 / 3, 6)))


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


def test_a_head_only_private_round_leaves_the_frozen_backbone_untouched(tmp_path):
    run = _run(trainable_stages=0)
    model = prepare_for_private_training(timm.create_model("resnet18", pretrained=False, num_classes=3), run.privacy.trainable_stages)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    ledger = PrivacyLedger.open(tmp_path, "a", "run", 1e-4)
    result = train_privately(
        model, _images(), run=run, ledger=ledger, server_round=1, device=torch.device("cpu"),
        precision=Precision(None, False, "cpu"), learning_rate_start=1e-2, learning_rate_end=1e-2, seed=0,
    )
    assert result.steps == 2 and result.epsilon > 0
    after = model.state_dict()
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    assert all(torch.equal(before[name], after[name]) for name in before if not name.startswith("fc."))


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
    saved = json.loads(RunFolder(tmp_path).privacy.read_text())
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
    assert json.loads(RunFolder(tmp_path).privacy.read_text())["settings"]["mode"] == "central"
    plain = build_strategy(_run(), MetricHistory(tmp_path / "plain"), CheckpointWriter(tmp_path / "plain", model, run))
    assert not isinstance(plain, CentralPrivacyStrategy)
