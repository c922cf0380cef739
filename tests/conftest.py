"""Test-wide settings: quiet Flower, deterministic torch, the real-data path setting."""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import shared  # noqa: E402,F401 - installs the torchvision shim before any test imports timm


def ray_processes() -> set[str]:
    """Process ids of the Ray daemons running now (raylet, GCS server)."""
    listing = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listing.splitlines() if "raylet" in line or "gcs_server" in line}


@dataclass
class SimulatedRun:
    """A finished skin-fl-sim run: its working folder, the command's result, its run folder, Ray daemons before and after."""

    folder: Path
    result: subprocess.CompletedProcess
    run_folder: Path
    ray_before: set[str]
    ray_after: set[str]


@pytest.fixture(scope="session")
def demo_simulation(tmp_path_factory) -> SimulatedRun:
    """One real simulation, 3 demo sites x 2 rounds with site reports (and personalised models), read by the end-to-end tests that check its outputs."""
    folder = tmp_path_factory.mktemp("demo-simulation")
    ray_before = ray_processes()
    result = subprocess.run(
        [
            sys.executable, "-m", "simulation.cli",
            "--demo-images", "150", "--rounds", "2", "--image-size", "64", "--batch-size", "16", "--batch-norm", "recalibrate",
            "--centralised", "--personalise-epochs", "0.5", "--runs-dir", str(folder / "runs"), "--cache-dir", str(folder / "cache"),
        ],
        cwd=folder, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_folder,) = (folder / "runs").iterdir()
    return SimulatedRun(folder, result, run_folder, ray_before, ray_processes())
