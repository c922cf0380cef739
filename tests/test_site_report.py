"""Unit tests of the report pieces: coordinator's aggregate-only report, report folders, gallery choice, settings."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from client.report import gallery_choices, site_report_folder
from server.aggregate_report import write_aggregate_report
from shared.config import run_config_from_flower
from shared.errors import DataError

CLASSES = ["a", "b", "c"]


def test_aggregate_report_pools_confusion_counts_and_weights_aucs(tmp_path):
    per_site = {
        "north": {"num-examples": 4, "confusion-matrix": [2, 0, 0, 0, 1, 1, 0, 0, 0], "per-class-auc": [0.9, 0.5, float("nan")],
                  "balanced-accuracy": 0.75},
        "south": {"num-examples": 6, "confusion-matrix": [1, 1, 0, 0, 2, 0, 0, 0, 2], "per-class-auc": [0.7, 1.0, 0.8],
                  "balanced-accuracy": 0.8333},
    }
    report = write_aggregate_report(tmp_path / "report", per_site, CLASSES)
    pooled = report["pooled"]
    assert pooled["confusion_matrix"] == [[3, 1, 0], [0, 3, 1], [0, 0, 2]]
    assert pooled["balanced_accuracy"] == pytest.approx((3 / 4 + 3 / 4 + 1) / 3)
    assert pooled["per_class"]["a"]["auc"] == pytest.approx((0.9 * 4 + 0.7 * 6) / 10)
    assert pooled["per_class"]["c"]["auc"] == pytest.approx(0.8)  # NaN (no such images at a site) is left out
    assert report["mean_site_balanced_accuracy"] == pytest.approx((0.75 + 0.8333) / 2)
    written = json.loads((tmp_path / "report" / "report.json").read_text())
    assert written["num_examples"] == 10 and set(written["sites"]) == {"north", "south"}
    assert (tmp_path / "report" / "confusion_matrix.png").stat().st_size > 0
    assert (tmp_path / "report" / "per_class.txt").read_text().splitlines()[0].split() == ["support", "recall", "precision", "auc"]


def test_aggregate_report_refuses_a_foreign_class_list(tmp_path):
    with pytest.raises(DataError, match="sent 4 confusion counts for 3 classes"):
        write_aggregate_report(tmp_path, {"x": {"num-examples": 1, "confusion-matrix": [1, 0, 0, 0]}}, CLASSES)


def test_report_folder_of_a_simulated_and_a_deployed_site(tmp_path):
    simulated = SimpleNamespace(manifest_path=tmp_path / "run" / "sites" / "manifest.json")
    assert site_report_folder(simulated, None, "clinic a") == tmp_path / "run" / "sites" / "clinic_a" / "report"
    context = SimpleNamespace(node_config={"site": "vienna", "report-dir": str(tmp_path / "reports")}, run_id=42)
    assert site_report_folder(SimpleNamespace(), context, "vienna") == tmp_path / "reports" / "vienna" / "run-42"


def test_gallery_picks_the_most_confident_correct_and_wrong_images_per_class():
    probabilities = np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.2, 0.8, 0.0], [0.7, 0.3, 0.0], [0.1, 0.2, 0.7]])
    labels = np.array([0, 0, 0, 1, 2])
    chosen = gallery_choices(labels, probabilities, per_class=1)
    assert chosen[0] == {"correct": [0], "wrong": [2]}
    assert chosen[1] == {"correct": [], "wrong": [3]}
    assert chosen[2] == {"correct": [4], "wrong": []}


def test_report_settings_travel_in_the_flower_run_config():
    run = run_config_from_flower({"site-reports": False, "report-gallery-size": 5, "report-gradcam-method": "gradcam++"})
    assert (run.report.site_reports, run.report.gallery_per_class, run.report.gradcam_method) == (False, 5, "gradcam++")
    with pytest.raises(ValueError, match="report"):
        run_config_from_flower({"report-gradcam-method": "lime"})
