"""skin-fl-report and skin-fl-explain on a briefly trained demo model: report folder, overlays, ensembles, ONNX."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from client import evaluate_cli, explain_cli, report_cli
from client.report import REPORT_FILES
from demo_model_support import shared_demo_model
from shared.models.classifier import load_classifier, save_classifier

pytestmark = pytest.mark.slow


def test_report_command_writes_a_complete_offline_report(tmp_path):
    demo = shared_demo_model()
    output = tmp_path / "report"
    code = report_cli.main([str(demo.model_path), "--data", str(demo.data_folder), "--output", str(output),
                            "--site", "clinic-a", "--cache-dir", str(tmp_path / "cache"), "--gallery-size", "2"])
    assert code == 0
    for name in REPORT_FILES:
        assert (output / name).stat().st_size > 0, name
    report = json.loads((output / "metrics.json").read_text())
    assert report["site"] == "clinic-a" and report["num_examples"] == 140
    # Briefly trained on the same generated style: clearly better than chance (1/7).
    assert report["isic"]["aggregate"]["balanced_accuracy"] > 0.5
    assert report["metrics"]["balanced_accuracy"] == pytest.approx(report["isic"]["aggregate"]["balanced_accuracy"])
    gallery = (output / "gallery.html").read_text()
    assert "<h3>correct</h3>" in gallery and "<h3>wrong</h3>" in gallery
    assert gallery.count("data:image/png;base64,") == 2 * report["gallery"]["images"]
    with open(output / "per_class.csv") as handle:
        assert handle.readline().strip().split(",")[:4] == ["class", "support", "sensitivity", "specificity"]
        assert len(handle.readlines()) == 7


def test_explain_command_writes_overlays_and_agrees_across_ensemble_and_onnx(tmp_path, capsys):
    demo = shared_demo_model()
    images = sorted((demo.data_folder / "mel").iterdir())[:3]
    onnx_path = tmp_path / "model.onnx"
    single = tmp_path / "single"
    assert explain_cli.main([*map(str, images), "--model", str(demo.model_path), "--output", str(single),
                             "--export-onnx", str(onnx_path)]) == 0
    table = capsys.readouterr().out
    assert "predicted" in table and images[0].name in table
    predictions = json.loads((single / "predictions.json").read_text())["predictions"]
    assert [row["image"] for row in predictions] == list(map(str, images))
    for row in predictions:
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        overlay = np.asarray(Image.open(single / row["overlay"]))
        assert overlay.shape == (explain_cli.DISPLAY_SIZE, explain_cli.DISPLAY_SIZE, 3)

    # A second member: the demo model with another classification layer.
    model, saved = load_classifier(demo.model_path)
    with torch.no_grad():
        model.get_classifier().weight.add_(torch.randn_like(model.get_classifier().weight, generator=torch.Generator().manual_seed(3)))
    other = save_classifier(tmp_path / "other.pt", model, model_name=saved.model_name, classes=saved.classes, preprocess=saved.preprocess)
    other_out = tmp_path / "other"
    assert explain_cli.main([*map(str, images), "--model", str(other), "--output", str(other_out)]) == 0
    other_rows = json.loads((other_out / "predictions.json").read_text())["predictions"]
    pair = tmp_path / "ensemble"
    assert explain_cli.main([str(demo.data_folder / "mel"), "--model", str(demo.model_path), "--model", str(other),
                             "--output", str(pair)]) == 0
    ensemble_rows = {row["image"]: row for row in json.loads((pair / "predictions.json").read_text())["predictions"]}
    onnx_out = tmp_path / "onnx"
    assert explain_cli.main([*map(str, images), "--onnx", str(onnx_path), "--output", str(onnx_out)]) == 0
    onnx_rows = json.loads((onnx_out / "predictions.json").read_text())["predictions"]
    assert any(row["probabilities"] != pytest.approx(other_row["probabilities"], abs=1e-3) for row, other_row in zip(predictions, other_rows))
    for row, other_row, onnx_row in zip(predictions, other_rows, onnx_rows):
        # The ensemble's probabilities are its two members' mean; ONNX Runtime agrees with PyTorch.
        for name, value in row["probabilities"].items():
            mean = (value + other_row["probabilities"][name]) / 2
            assert ensemble_rows[row["image"]]["probabilities"][name] == pytest.approx(mean, abs=1e-5)
            assert onnx_row["probabilities"][name] == pytest.approx(value, abs=1e-4)
        torch_overlay = np.asarray(Image.open(single / row["overlay"])).astype(int)
        onnx_overlay = np.asarray(Image.open(onnx_out / onnx_row["overlay"])).astype(int)
        assert np.abs(torch_overlay - onnx_overlay).max() <= 2


def test_eval_command_accepts_several_models(tmp_path):
    demo = shared_demo_model()
    output = tmp_path / "eval.json"
    assert evaluate_cli.main([str(demo.model_path), str(demo.model_path), "--data", str(demo.data_folder),
                              "--cache-dir", str(tmp_path / "cache"), "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert len(result["models"]) == 2 and result["metrics"]["num_examples"] == 140
    assert "auc_sens_80" in result["metrics"]["isic"]["per_category"]["mel"]
