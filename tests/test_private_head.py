"""The linear-head DP recipe: settings, accounting of head steps and noisy class counts, cached features, signal-to-noise."""

import numpy as np
import pytest
import timm
import torch

from shared.config import PrivacyConfig, RunConfig, run_config_from_flower
from shared.data.cache import CachedImages
from shared.errors import ModelError
from shared.models import frozen_features as frozen_features_module
from shared.models.frozen_features import frozen_features
from shared.precision import Precision
from shared.privacy.accounting import CLASS_COUNTS_LABEL, PrivacyBudgetExceeded, PrivacyLedger, RoundSchedule, epsilon_of
from shared.privacy.head_training import signal_to_noise
from shared.privacy.model_preparation import prepare_for_private_training
from shared.privacy.training import train_privately
from simulation.privacy_curve import summarise
from site_images import random_site_images

LOCAL = {"mode": "local", "target_epsilon": 3.0, "target_delta": 1e-4, "max_grad_norm": 1.0}
CLASSES = ["mel", "nv", "bcc"]
CPU = Precision(None, False, "cpu")


def _run(rounds: int = 3, **privacy) -> RunConfig:
    return RunConfig(
        classes=CLASSES,
        model={"name": "tf_efficientnet_lite0", "pretrained": "none"},
        train={"balance": "none", "augment": False, "progress": False},
        federation={"rounds": rounds},
        privacy={**LOCAL, "head_steps_per_round": 4, **privacy},
    )


def _images(count: int = 12, size: int = 32) -> CachedImages:
    return random_site_images(CLASSES, count, size)


def _model(run: RunConfig):
    torch.manual_seed(0)
    return prepare_for_private_training(timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3), run.privacy.prepared_stages)


def _train(model, run, ledger, server_round, images=None):
    return train_privately(
        model, images or _images(), run=run, ledger=ledger, server_round=server_round, device=torch.device("cpu"),
        precision=CPU, learning_rate_start=1e-3, learning_rate_end=1e-3, seed=server_round,
    )


def test_local_privacy_defaults_to_the_linear_head_and_trainable_stages_picks_fine_tuning():
    assert PrivacyConfig(**LOCAL).recipe == "linear-head" and PrivacyConfig(**LOCAL).prepared_stages == 0
    assert PrivacyConfig(**LOCAL, trainable_stages=1).recipe == "fine-tune"
    assert PrivacyConfig(**LOCAL, recipe="fine-tune").prepared_stages is None
    with pytest.raises(ValueError, match="drop trainable_stages or set recipe 'fine-tune'"):
        PrivacyConfig(**LOCAL, recipe="linear-head", trainable_stages=0)
    with pytest.raises(ValueError, match=r"\['head_learning_rate'\] are given but privacy.mode is 'off'"):
        PrivacyConfig(head_learning_rate=0.5)
    with pytest.raises(ValueError, match="apply to local DP-SGD only"):
        PrivacyConfig(mode="central", noise_multiplier=1.0, max_grad_norm=1.0, recipe="linear-head")
    flat = {"balance": "none", "privacy-mode": "local", "privacy-target-epsilon": 8.0, "privacy-target-delta": 1e-5,
            "privacy-max-grad-norm": 1.0, "privacy-recipe": "", "privacy-head-batch-size": 0, "privacy-head-steps-per-round": 7}
    privacy = run_config_from_flower(flat).privacy
    assert privacy.recipe == "linear-head" and privacy.head_batch_size is None and privacy.head_steps_per_round == 7


def test_the_noise_covers_every_head_step_of_the_run_and_the_one_release_of_class_counts():
    run = _run(head_batch_size=4)
    head_round, counts = RoundSchedule.for_site(run, 12), RoundSchedule.for_class_counts(run, 12)
    assert head_round.steps == 4 and head_round.sample_rate == pytest.approx(1 / 3) and head_round.run_steps == 3 * 4 + 1
    assert counts.entry() == (head_round.noise_multiplier, 1.0, 1)
    whole_run = epsilon_of([counts.entry()] + [head_round.entry()] * 3, 1e-4)
    assert 3.0 - 0.02 <= whole_run <= 3.0
    assert RoundSchedule.for_site(_run(), 12).sample_rate == 1.0  # default: every image in every step


def test_a_head_round_trains_only_the_classification_layer_and_pays_for_the_counts_once(tmp_path):
    run = _run()
    model = _model(run)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    ledger = PrivacyLedger.open(tmp_path, "a", "run", 1e-4)
    results = [_train(model, run, ledger, server_round) for server_round in (1, 2, 3)]
    assert [result.steps for result in results] == [4, 4, 4] and results[0].sample_rate == 1.0
    assert [entry["round"] for entry in ledger.rounds] == [CLASS_COUNTS_LABEL, 1, 2, 3]
    noisy = ledger.rounds[0]["noisy_counts"]
    assert len(noisy) == 3 and min(noisy) >= 1.0 and noisy != [4.0, 4.0, 4.0]
    assert 0 < results[0].epsilon < results[1].epsilon < results[2].epsilon <= 3.0
    assert PrivacyLedger.open(tmp_path, "a", "run", 1e-4).released(CLASS_COUNTS_LABEL)["noisy_counts"] == noisy
    changed = {name for name, value in model.state_dict().items() if not torch.equal(before[name], value)}
    assert changed == {"classifier.weight", "classifier.bias"}


def test_a_head_round_past_the_budget_releases_nothing(tmp_path):
    run = _run(noise_multiplier=0.5, target_epsilon=1.0)
    model = _model(run)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    ledger = PrivacyLedger.open(tmp_path, "a", "run", 1e-4)
    with pytest.raises(PrivacyBudgetExceeded, match="past the budget 1.0"):
        _train(model, run, ledger, 1)
    assert ledger.rounds == [] and not ledger.path.exists()
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_the_linear_head_recipe_needs_a_head_only_model(tmp_path):
    run = _run()
    model = prepare_for_private_training(timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3))
    with pytest.raises(ModelError, match="prepare_for_private_training\\(model, 0\\)"):
        _train(model, run, PrivacyLedger.open(tmp_path, "a", "run", 1e-4), 1)


def test_frozen_features_are_computed_once_kept_on_disk_and_follow_the_frozen_weights(tmp_path, monkeypatch):
    run = _run()
    model, images = _model(run), _images()
    first = frozen_features(model, images, device=torch.device("cpu"), precision=CPU, cache_dir=tmp_path)
    assert first.shape == (12, model.num_features) and len(list(tmp_path.glob("*.pt"))) == 1
    assert frozen_features(model, images, device=torch.device("cpu"), precision=CPU) is first
    with torch.no_grad():
        model.classifier.weight.add_(1.0)  # the head is not part of the key
    assert frozen_features(model, images, device=torch.device("cpu"), precision=CPU) is first
    monkeypatch.setattr(frozen_features_module, "_cache", type(frozen_features_module._cache)())
    reloaded = frozen_features(model, images, device=torch.device("cpu"), precision=CPU, cache_dir=tmp_path)
    assert torch.equal(reloaded, first) and reloaded is not first
    with torch.no_grad():
        model.conv_stem.weight.mul_(2.0)
    changed = frozen_features(model, images, device=torch.device("cpu"), precision=CPU)
    assert not torch.equal(changed, first)


def test_the_signal_to_noise_estimate_is_the_summed_clipped_gradient_over_the_noise_norm():
    torch.manual_seed(0)
    head = torch.nn.Linear(5, 3)
    features, labels, shift = torch.randn(8, 5) * 3, torch.arange(8) % 3, torch.log(torch.tensor([0.5, 0.3, 0.2]))
    schedule = RoundSchedule(sample_rate=0.5, steps=4, noise_multiplier=2.0, run_steps=12)
    summed = [torch.zeros_like(head.weight), torch.zeros_like(head.bias)]
    for image in range(8):
        head.zero_grad()
        torch.nn.functional.cross_entropy(head(features[image : image + 1]) + shift, labels[image : image + 1]).backward()
        norm = torch.cat([head.weight.grad.flatten(), head.bias.grad]).norm()
        factor = min(1.0, 0.7 / float(norm))
        summed[0] += head.weight.grad * factor
        summed[1] += head.bias.grad * factor
    expected = 0.5 * float(torch.cat([summed[0].flatten(), summed[1]]).norm()) / (2.0 * 0.7 * (15 + 3) ** 0.5)
    assert signal_to_noise(head, features, labels, shift, schedule, 0.7) == pytest.approx(expected, rel=1e-5)


def test_the_curve_table_gives_mean_and_spread_over_seeds_and_the_ratio_to_the_no_noise_recipe():
    cells = [
        {"epsilon_target": None, "balanced_accuracy": 0.5, "macro_auc": 0.8},
        {"epsilon_target": None, "balanced_accuracy": 0.6, "macro_auc": 0.9},
        {"epsilon_target": 8.0, "balanced_accuracy": 0.44, "macro_auc": 0.8},
        {"epsilon_target": 8.0, "balanced_accuracy": 0.44, "macro_auc": 0.8},
    ]
    table, rows = summarise(cells, reference=0.632)
    assert [row["epsilon"] for row in rows] == [8.0, None]
    assert rows[0]["ratio_to_no_noise"] == pytest.approx(0.8) and rows[0]["balanced_accuracy_sd"] == 0.0
    assert rows[1]["balanced_accuracy_sd"] == pytest.approx(np.std([0.5, 0.6], ddof=1))
    assert "| 8 | 2 | 0.440 ± 0.000 | 0.800 ± 0.000 | 0.80 |" in table and "0.632" in table


def test_the_privacy_plan_shows_every_site_and_warns_only_for_the_one_too_small_for_its_epsilon(capsys):
    from simulation.privacy_options import print_privacy_plan

    run = _run(rounds=5, target_epsilon=8.0, target_delta=1e-5, head_steps_per_round=20)
    print_privacy_plan(run, {"large": 5000, "tiny": 30})
    printed = capsys.readouterr().out
    assert "large: 5000 training images" in printed and "tiny: 30 training images" in printed
    assert "sampling rate 1.000, 20 steps a round, epsilon 7.9" in printed and "3843 trained parameters" in printed
    assert "warning: tiny's updates will be mostly noise" in printed and "warning: large" not in printed
