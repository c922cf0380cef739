"""skin-fl-rehearse: one command brings up a federation from start-up kits, finishes a run and leaves nothing running."""

import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.rehearsal import main
from deploy_harness import FAST_RUN_CONFIG
from server.run_config_file import write_run_config_file

pytestmark = pytest.mark.slow


def processes_naming(folder):
    """Live processes whose command line names `folder` (the server, nginx, SuperLink, clients and SuperNodes all do)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(folder) in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_the_rehearsal_finishes_a_run_through_nginx_from_start_up_kits_and_stops_everything(tmp_path):
    run_config = write_run_config_file(tmp_path / "quick.toml", {**FAST_RUN_CONFIG, "num-server-rounds": 1})
    workdir = tmp_path / "rehearsal"
    result = subprocess.run(
        [sys.executable, "-m", "coordinator.rehearsal", "--sites", "1", "--run-config", str(run_config), "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    lines = result.stdout.splitlines()
    assert any("Hospital A started from their start-up kits" in line and "connected" in line for line in lines), lines
    assert any(line.startswith("skin-fl-rehearse: ") and " round 1/1: 1/1 sites" in line for line in lines), lines
    assert lines[-2].startswith("skin-fl-rehearse: rehearsal passed in") and lines[-1] == f"skin-fl-rehearse: folder kept: {workdir}"
    (run_folder,) = (workdir / "state" / "runs").iterdir()
    assert (run_folder / "final_model.pt").is_file()
    client_log = (workdir / "logs" / "client-hospital-a.log").read_text()
    assert f"site key {workdir / 'credentials' / 'kits' / 'hospital-a' / 'hospital-a.key'}" in client_log
    assert "POST /v1/fleet/push-messages" in (workdir / "state" / "nginx" / "logs" / "access.log").read_text()
    assert not processes_naming(workdir), "the rehearsal left processes running"


def test_a_rehearsal_refuses_a_folder_in_use_and_an_impossible_site_count(tmp_path, capsys):
    (tmp_path / "in-use").mkdir()
    (tmp_path / "in-use" / "notes.txt").write_text("keep me")
    assert main(["--workdir", str(tmp_path / "in-use")]) == 2
    assert "is not empty; give a new or empty --workdir" in capsys.readouterr().err
    assert (tmp_path / "in-use" / "notes.txt").read_text() == "keep me"
    assert main(["--sites", "0"]) == 2
