"""End to end: a real Flower simulation with one federated GAN round, synthesis at 3 demo sites and a classifier round."""

import csv
import json
import math
import subprocess
import sys

import pytest

from shared.gan.models import latest_gan_checkpoint, load_gan

pytestmark = pytest.mark.slow


def test_gan_round_then_augmented_classifier_round_on_demo_sites(tmp_path):
    result = subprocess.run(
        [
            sys.executable, "-m", "simulation.cli",
            "--demo-images", "150", "--rounds", "1", "--image-size", "32", "--batch-size", "16", "--max-steps-per-epoch", "2",
            "--gan-rounds", "1", "--gan-image-size", "32", "--gan-channels", "8", "--gan-local-steps", "2",
            "--gan-batch-size", "8", "--gan-augment", "--gan-target", "ratio", "--gan-target-ratio", "0.5", "--head-refit-steps", "2",
            "--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"),
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_folder,) = (tmp_path / "runs").iterdir()

    server_round, checkpoint = latest_gan_checkpoint(run_folder)
    assert server_round == 1
    _, _, saved = load_gan(checkpoint)
    assert saved.image_size == 32 and saved.metadata["round"] == 1
    assert (run_folder / "gan" / "grids" / "round_001.png").is_file()
    (entry,) = json.loads((run_folder / "gan" / "history.json").read_text())["rounds"]
    assert len(entry["sites"]) == 3 and math.isfinite(entry["frechet-distance"])

    with open(run_folder / "synthetic_counts.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 and sum(int(row["synthetic-images"]) for row in rows) > 0
    # The coordinator holds each site's totals only; the per-class detail stays in the site's own selection report.
    selection = json.loads((run_folder / "gan" / "selection.json").read_text())
    rejections = {"rejected-unrealistic", "rejected-memorised", "rejected-near-duplicate"}
    assert all(rejections <= set(report) for report in selection.values() if "candidates" in report)
    assert not any("real" in report or "thresholds" in report for report in selection.values())
    assert len(list((run_folder / "sites" / "synthetic").glob("*/*.selection.json"))) == 3

    # Every site evaluated on exactly its real test images: no synthetic image reached a test split.
    with open(run_folder / "site_split_class_counts.csv") as handle:
        split_rows = {row[next(iter(row))]: row for row in csv.DictReader(handle)}
    history = json.loads((run_folder / "history.json").read_text())["rounds"]
    synthetic = {row["site"]: int(row["synthetic-images"]) for row in rows}
    for site, metrics in history[-1]["sites"].items():
        real_test = sum(int(value) for key, value in split_rows[f"{site} [test]"].items() if key in saved.classes)
        real_train = sum(int(value) for key, value in split_rows[f"{site} [train]"].items() if key in saved.classes)
        assert metrics["evaluate"]["num-examples"] == real_test
        assert metrics["train"]["num-examples"] == real_train + synthetic[site]


def test_gan_only_run_resumes_from_a_checkpoint(tmp_path):
    common = [
        sys.executable, "-m", "simulation.cli", "--demo-images", "150", "--image-size", "32", "--gan-only",
        "--gan-image-size", "32", "--gan-channels", "8", "--gan-local-steps", "2", "--gan-batch-size", "8",
        "--cache-dir", str(tmp_path / "cache"),
    ]
    first = subprocess.run(
        [*common, "--gan-rounds", "1", "--runs-dir", str(tmp_path / "first")], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    (first_folder,) = (tmp_path / "first").iterdir()
    assert not (first_folder / "history.json").exists()  # no classifier rounds in a GAN-only run
    server_round, checkpoint = latest_gan_checkpoint(first_folder)
    resumed = subprocess.run(
        [*common, "--gan-rounds", "2", "--gan-generator", str(checkpoint), "--gan-start-round", str(server_round + 1),
         "--runs-dir", str(tmp_path / "resumed")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    (resumed_folder,) = (tmp_path / "resumed").iterdir()
    assert latest_gan_checkpoint(resumed_folder)[0] == 2
    assert not (resumed_folder / "gan" / "checkpoints" / "round_001.pt").exists()
    assert [entry["round"] for entry in json.loads((resumed_folder / "gan" / "history.json").read_text())["rounds"]] == [2]
