"""Run settings: Flower's flat keys, validation errors that name the fix, round instructions."""

import pytest

from shared.config import RoundInstructions, RunConfig, TrainConfig, run_config_from_flower
from shared.errors import ConfigError


def test_flower_keys_map_into_the_nested_settings():
    run = run_config_from_flower(
        {"num-server-rounds": 4, "model": "resnet18", "batch-size": 8, "classes": "a, b ,c", "grad-clip-norm": 0}
    )
    assert run.federation.rounds == 4
    assert run.model.name == "resnet18"
    assert run.train.batch_size == 8
    assert run.classes == ["a", "b", "c"]
    assert run.train.grad_clip_norm is None


def test_unknown_flower_key_is_an_error_listing_known_keys():
    with pytest.raises(ConfigError, match="unknown run-config key.*'num-rounds'.*known keys"):
        run_config_from_flower({"num-rounds": 3})


def test_invalid_value_is_a_config_error():
    with pytest.raises(ConfigError, match="batch_size"):
        run_config_from_flower({"batch-size": 0})


def test_split_fractions_must_sum_to_one():
    with pytest.raises(ValueError, match="summing to 1"):
        RunConfig(split_fractions=(0.5, 0.2, 0.2))


def test_missing_pretrained_file_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="does not exist.*'none' for random init"):
        RunConfig(model={"pretrained": str(tmp_path / "absent.pth")})


def test_focal_gamma_without_focal_loss_is_contradictory():
    with pytest.raises(ValueError, match="set loss='focal'"):
        TrainConfig(focal_gamma=3.0)


def test_proximal_term_without_fedprox_is_contradictory():
    with pytest.raises(ValueError, match="strategy is not fedprox"):
        RunConfig(train={"proximal_mu": 0.1})


def test_round_instructions_follow_one_cosine_schedule_over_all_rounds():
    run = RunConfig(federation={"rounds": 4}, train={"learning_rate": 1e-3, "min_learning_rate_ratio": 0.1})
    rounds = [RoundInstructions.for_round(run, number) for number in range(1, 5)]
    assert rounds[0].learning_rate_start == pytest.approx(1e-3)
    assert rounds[-1].learning_rate_end == pytest.approx(1e-4)
    for earlier, later in zip(rounds, rounds[1:]):
        assert earlier.learning_rate_end == pytest.approx(later.learning_rate_start)
        assert later.learning_rate_start < earlier.learning_rate_start


def test_round_instructions_carry_fedprox_weight_and_no_server_paths():
    run = RunConfig(federation={"strategy": "fedprox", "proximal_mu": 0.05})
    instructions = RoundInstructions.for_round(run, 1)
    assert instructions.run.train.proximal_mu == 0.05
    assert instructions.run.model.pretrained == "none"
    assert RoundInstructions.model_validate_json(instructions.model_dump_json()) == instructions


def test_a_site_accepts_settings_naming_files_on_the_coordinators_disk_and_user_input_still_checks_them(tmp_path):
    from shared.config import RoundInstructions, RunConfig

    generator = tmp_path / "round_006.pt"
    generator.write_bytes(b"checkpoint")
    run = RunConfig(gan={"generator": str(generator), "feature_classifier": str(generator)})
    message = RoundInstructions.for_round(run, 1).model_dump_json()
    generator.unlink()  # the site is another machine: the coordinator's files are not there
    received = RoundInstructions.from_coordinator(message)
    assert received.run.gan.generator == str(generator.resolve())
    assert RunConfig.from_coordinator(run.model_dump_json()).gan.feature_classifier == str(generator.resolve())
    with pytest.raises(ValueError, match="generator file .* does not exist"):
        RunConfig.model_validate_json(run.model_dump_json())
