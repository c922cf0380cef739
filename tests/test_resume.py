"""Finding where an interrupted run folder stands: last completed round, its weights and history."""

import csv
import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from server.checkpoint import CheckpointWriter
from server.history import MetricHistory
from server.resume import find_resume_point, gan_phase_needed, note_resume, restore_history
from shared.config import FederationConfig, GanConfig, ModelConfig, RunConfig
from shared.durable_files import write_json_atomically
from shared.errors import ConfigError
from shared.models.classifier import build_classifier
from shared.weights import model_to_arrays

SITES = ["Hospital A", "St Mary's"]


def make_run_folder(folder, rounds=3, trained=(1, 2, 3), evaluated=(1, 2), checkpointed=(1, 2, 3)):
    """A run folder as the server writes it, with a distinct global model checkpointed per round."""
    run = RunConfig(
        classes=["nv", "mel", "bcc"],
        model=ModelConfig(name="test_efficientnet", pretrained="none"),
        federation=FederationConfig(rounds=rounds),
    )
    folder.mkdir(parents=True)
    write_json_atomically(folder / "config.json", run.model_dump(mode="json"))
    model = build_classifier(run.model, num_classes=3)
    writer = CheckpointWriter(folder, model, run)
    history = MetricHistory(folder)
    weights = {}
    for number in range(1, rounds + 1):
        arrays = {name: np.full_like(value, number / 10) for name, value in model_to_arrays(model).items()}
        weights[number] = arrays
        if number in checkpointed:
            writer.save_round(number, ArrayRecord({name: Array(value) for name, value in arrays.items()}))
        if number in trained:
            history.record_train(number, {"train-loss": 1.0 / number}, {site: {"train-loss": 1.0} for site in SITES}, 1.0)
        if number in evaluated:
            history.record_evaluate(number, {"accuracy": 0.5}, {SITES[0]: {"accuracy": 0.5}}, 1.0, missing=[SITES[1]])
    return run, weights


def test_the_round_in_flight_is_dropped_and_the_last_completed_rounds_weights_are_restored(tmp_path):
    folder = tmp_path / "run"
    run, weights = make_run_folder(folder)  # round 3 trained and checkpointed, never evaluated
    point = find_resume_point(folder)
    assert point.run == run
    assert point.completed_rounds == 2 and point.remaining_rounds == 1
    assert [entry["round"] for entry in point.history_rounds] == [1, 2]
    for name, value in weights[2].items():
        np.testing.assert_allclose(point.arrays[name], value, rtol=1e-6)
    history = restore_history(point)
    saved = json.loads((folder / "history.json").read_text())["rounds"]
    assert [entry["round"] for entry in saved] == [1, 2] and history.as_list() == saved


def test_a_missing_checkpoint_ends_the_completed_rounds(tmp_path):
    make_run_folder(tmp_path / "run", evaluated=(1, 2, 3), checkpointed=(1, 3))
    assert find_resume_point(tmp_path / "run").completed_rounds == 1


def test_a_zero_length_newest_checkpoint_falls_back_to_the_newest_that_loads_and_says_so(tmp_path, caplog):
    folder = tmp_path / "run"
    _, weights = make_run_folder(folder, rounds=4, trained=(1, 2, 3), evaluated=(1, 2, 3), checkpointed=(1, 2, 3))
    (folder / "checkpoints" / "round_003.pt").write_bytes(b"")  # a power loss after the rename, before the data reached the disk
    point = find_resume_point(folder)
    assert point.completed_rounds == 2 and point.unloadable_checkpoints == [3]
    assert [entry["round"] for entry in point.history_rounds] == [1, 2]
    for name, value in weights[2].items():
        np.testing.assert_allclose(point.arrays[name], value, rtol=1e-6)
    assert "checkpoints of round(s) 3 do not load; the run continues after round 2" in caplog.text


def test_a_run_interrupted_in_its_first_round_starts_again_from_the_initial_weights(tmp_path):
    make_run_folder(tmp_path / "run", trained=(1,), evaluated=(), checkpointed=())
    point = find_resume_point(tmp_path / "run")
    assert point.completed_rounds == 0 and point.arrays is None and point.history_rounds == []
    assert gan_phase_needed(point)


def test_a_finished_run_and_a_foreign_folder_are_refused_with_the_fix(tmp_path):
    make_run_folder(tmp_path / "done", evaluated=(1, 2, 3))
    with pytest.raises(ConfigError, match="already finished all 3 rounds.*Start a new run"):
        find_resume_point(tmp_path / "done")
    (tmp_path / "other").mkdir()
    with pytest.raises(ConfigError, match="not a skin-fl run folder .no config.json"):
        find_resume_point(tmp_path / "other")


def test_resumes_are_noted_and_differing_submitted_settings_are_named(tmp_path):
    run, _ = make_run_folder(tmp_path / "run")
    point = find_resume_point(tmp_path / "run")
    note_resume(point, submitted=run.model_copy(update={"seed": 7}))
    (note,) = json.loads((tmp_path / "run" / "resumes.json").read_text())
    assert note["after_round"] == 2 and note["ignored_submitted_settings"] == ["seed"]


def test_resuming_classifier_rounds_of_an_augmented_run_is_refused(tmp_path):
    make_run_folder(tmp_path / "run")
    point = find_resume_point(tmp_path / "run")
    assert not gan_phase_needed(point)
    point.run = point.run.model_copy(update={"gan": GanConfig(rounds=2, augment=True)})
    with pytest.raises(ConfigError, match="augmented.*gan-generator"):
        gan_phase_needed(point)


def test_the_per_round_table_names_the_sites_that_took_part_and_those_that_did_not(tmp_path):
    make_run_folder(tmp_path / "run")
    with (tmp_path / "run" / "metrics_per_round.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0]["train_sites"] == "Hospital A;St Mary's" and rows[0]["train_missing_sites"] == ""
    assert rows[0]["evaluate_sites"] == "Hospital A" and rows[0]["evaluate_missing_sites"] == "St Mary's"


def test_a_run_that_wrote_its_final_model_is_not_resumed(tmp_path):
    make_run_folder(tmp_path / "run")
    (tmp_path / "run" / "final_model.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="already has its final_model.pt.*nothing to resume"):
        find_resume_point(tmp_path / "run")
