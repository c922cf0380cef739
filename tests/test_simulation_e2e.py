"""End to end: a real Flower simulation of 3 demo sites x 2 rounds (the shared `demo_simulation`), pooled baseline, then skin-fl-eval."""

import json
import subprocess
import sys

import pytest
import torch

from shared.data.demo import write_demo_dataset
from shared.models.classifier import load_classifier

pytestmark = pytest.mark.slow


def _run(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=900)


def test_three_site_simulation_writes_the_run_folder_and_scores_an_unseen_folder(demo_simulation):
    result, run_folder, tmp_path = demo_simulation.result, demo_simulation.run_folder, demo_simulation.folder
    assert "overall" in result.stdout and "Pooled (centralised" in result.stdout

    history = json.loads((run_folder / "history.json").read_text())["rounds"]
    assert [entry["round"] for entry in history] == [1, 2]
    for entry in history:
        assert len(entry["train_sites"]) == 3 and len(entry["evaluate_sites"]) == 3
        assert 0.0 <= entry["evaluate"]["balanced-accuracy"] <= 1.0
    for name in ("config.json", "metrics_per_round.csv", "metrics_per_site.csv", "metrics.png",
                 "site_class_counts.csv", "site_class_counts.txt", "summary.json",
                 "checkpoints/round_001.pt", "checkpoints/round_002.pt", "centralised/final_model.pt"):
        assert (run_folder / name).is_file(), name
    model, saved = load_classifier(run_folder / "final_model.pt")
    assert saved.classes == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert saved.preprocess.image_size == 64
    # The handed-on model is the best round on the sites' validation splits, its classification layer refitted
    # over the sites' features (unless that scored lower on their validation images), temperature-scaled on them.
    document = json.loads((run_folder / "history.json").read_text())
    best = max(history, key=lambda entry: (entry["evaluate"]["val-balanced-accuracy"], entry["round"]))["round"]
    assert document["selected_round"] == best == saved.metadata["selected_round"]
    temperature = saved.metadata["temperature"]
    assert 0.25 <= temperature <= 8.0
    selected, _ = load_classifier(run_folder / "checkpoints" / f"round_{best:03d}.pt")
    refit = saved.metadata["head_refit"]
    scores = refit["validation_balanced_accuracy"]
    assert len(scores) >= 2
    as_trained = torch.allclose(model.get_classifier().weight, selected.get_classifier().weight / temperature, atol=1e-6)
    assert as_trained is not refit["refitted"]
    if refit["refitted"]:
        assert scores[-1] >= scores[0]
    head = {id(parameter) for parameter in model.get_classifier().parameters()}
    handed_on, chosen = model.state_dict(keep_vars=True), selected.state_dict()
    for name, tensor in handed_on.items():
        if id(tensor) not in head:
            assert torch.equal(tensor, chosen[name]), f"{name} is not the selected round's"
    assert demo_simulation.ray_after <= demo_simulation.ray_before, "skin-fl-sim left Ray processes running"

    unseen = write_demo_dataset(tmp_path / "unseen", format="folder", num_images=60, seed=7)
    evaluation = _run(
        ["-m", "client.evaluate_cli", str(run_folder / "final_model.pt"), "--data", str(unseen),
         "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "eval.json")],
        cwd=tmp_path,
    )
    assert evaluation.returncode == 0, evaluation.stdout[-3000:] + evaluation.stderr[-3000:]
    scored = json.loads((tmp_path / "eval.json").read_text())
    assert scored["metrics"]["num_examples"] == 60
    assert "balanced accuracy" in evaluation.stdout
