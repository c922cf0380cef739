"""A plain classifier round imports no heavy library it does not use (each message is a fresh site process)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.data.demo import write_demo_dataset
from simulation.message_imports import HEAVY_MODULES, MESSAGE_TYPES, heavy_modules_loaded

REPO = Path(__file__).resolve().parent.parent


def test_heavy_modules_are_found_by_their_package_name():
    loaded = {"numpy": None, "sklearn": None, "sklearn.metrics": None, "shared.gan": None, "shared.data": None}
    assert heavy_modules_loaded(loaded) == ["shared.gan", "sklearn"]
    assert {"opacus", "sklearn", "matplotlib", "onnx", "fastapi", "shared.gan"} <= set(HEAVY_MODULES)


@pytest.mark.slow  # a fresh process imports the whole stack and handles four messages
def test_classifier_messages_import_no_dp_gan_report_or_web_libraries(tmp_path):
    data = write_demo_dataset(tmp_path / "site", format="ham10000", num_images=56, num_sites=1, seed=3)
    completed = subprocess.run(
        [sys.executable, "-m", "simulation.message_imports", "--data", str(data), "--cache-dir", str(tmp_path / "cache"),
         "--model", "resnet18", "--message", *MESSAGE_TYPES],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    figures = json.loads(completed.stdout.strip().splitlines()[-1])
    assert figures["heavy_on_import"] == []
    assert [message["message_type"] for message in figures["messages"]] == list(MESSAGE_TYPES)
    for message in figures["messages"]:
        assert message["heavy_after"] == [], f"{message['message_type']} loaded {message['heavy_after']}"
