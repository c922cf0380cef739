"""A short natural-partition federated run on the real HAM10000 images (CI has them beside the checkout)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
HAM10000_DIR = Path(os.environ.get("SKIN_FL_HAM10000_DIR", REPOSITORY.parent / "shared" / "data" / "ham10000"))
CHANCE = 1 / 7

pytestmark = [
    pytest.mark.slow,
    pytest.mark.real_data,
    pytest.mark.skipif(
        not (HAM10000_DIR / "HAM10000_metadata.csv").is_file(),
        reason=f"no HAM10000 folder at {HAM10000_DIR}; set SKIN_FL_HAM10000_DIR to run this test",
    ),
]


def test_four_natural_sites_learn_well_above_chance(tmp_path):
    result = subprocess.run(
        [
            sys.executable, "-m", "simulation.cli",
            "--data", str(HAM10000_DIR), "--format", "ham10000", "--partition", "natural",
            "--rounds", "2", "--image-size", "64",
            # What is checked is the federation's own evaluation rounds; the handed-on model's refit is measured by skin-fl-bench.
            "--head-refit-steps", "0",
            "--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"),
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_folder,) = (tmp_path / "runs").iterdir()
    final = json.loads((run_folder / "history.json").read_text())["rounds"][-1]
    assert sorted(final["evaluate_sites"]) == ["rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias"]
    balanced_accuracy = final["evaluate"]["balanced-accuracy"]
    macro_auc = final["evaluate"]["macro-auc"]
    print(f"HAM10000, 4 natural sites, 2 rounds at 64 px: balanced accuracy {balanced_accuracy:.3f}, macro AUC {macro_auc:.3f}")
    # Measured on 2 cores: balanced accuracy 0.461 and macro AUC 0.809 after these 2 rounds at 64 px (0.349 and 0.643
    # while the new classification layer started from timm's random draw; at 96 px then, twice as long: 0.39-0.40 and
    # 0.73-0.74). Chance is 1/7 and an AUC of 0.5.
    assert balanced_accuracy > 2 * CHANCE
    assert macro_auc > 0.70
