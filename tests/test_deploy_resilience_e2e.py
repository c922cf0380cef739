"""End to end on loopback: sites run skin-fl-client; one site is killed mid-run, then the server dies and the run resumes."""

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from coordinator.certs import site_file_stem
from coordinator.deployment import _alive, descendants
from deploy_harness import FAST_RUN_CONFIG, Deployment, read_json

pytestmark = pytest.mark.slow

RESILIENT_RUN = {**FAST_RUN_CONFIG, "num-server-rounds": 2, "min-sites": 1, "round-timeout": 120.0}
"""Two rounds; one site is enough. A killed site is noticed by Flower's heartbeat check (about a minute),
so the timeout is only a safety net."""
STEP_TIMEOUT_S = 150


def kill_tree(process) -> None:
    """SIGKILL a process and everything below it at once, as a power cut would."""
    pids = [process.pid, *descendants(process.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)


def wait_for_history(deployment: Deployment, run_id: str, phase: str, server_round: int) -> tuple[Path, list[dict]]:
    """Wait until the run's history records `phase` ('train' or 'evaluate') of `server_round`."""
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while time.monotonic() < deadline:
        folders = sorted(deployment.layout.runs_dir.glob(f"*-run-{run_id}"))
        if folders and (folders[0] / "history.json").is_file():
            rounds = read_json(folders[0] / "history.json")["rounds"]
            if any(entry["round"] == server_round and f"{phase}_sites" in entry for entry in rounds):
                return folders[0], rounds
        time.sleep(0.1)
    raise AssertionError(f"run {run_id}: no {phase} of round {server_round} in {STEP_TIMEOUT_S} s\n{deployment.log_tails()}")


def restart_server(deployment: Deployment) -> None:
    """`skin-fl-server start` again on the same ports and state folder (database, runs, keys)."""
    command = [
        sys.executable, "-m", "coordinator.cli", "--state-dir", str(deployment.state_dir), "start",
        "--credentials", str(deployment.credentials), "--host", "127.0.0.1",
        "--port", str(deployment.public_port), "--superlink-port", str(deployment.superlink_port),
    ]
    deployment.server = deployment._spawn(command, "server-restarted.log")
    deployment.wait_for_output("server-restarted.log", "skin-fl server ready", deployment.server, 90)


def test_a_killed_site_does_not_stop_the_run_and_a_killed_server_resumes_without_repeating_rounds(tmp_path):
    with Deployment(tmp_path) as deployment:
        started = time.monotonic()
        deployment.make_credentials()
        deployment.make_site_data()
        deployment.start_server()
        clients = [deployment.start_site_from_kit(site) for site in deployment.sites]
        for site, client in zip(deployment.sites, clients):
            deployment.wait_for_output(f"client-{site_file_stem(site.name)}.log", "is connected", client, 60)
        beta = clients[1]
        run_id = deployment.submit(RESILIENT_RUN)

        # A site disappears (power cut) as soon as round 1's training is aggregated, before it evaluates.
        wait_for_history(deployment, run_id, "train", 1)
        kill_tree(beta)
        # The server dies once round 1 is done (the evaluation waited for the dead site until Flower
        # declared it unavailable); round 2 is in flight.
        folder, before_crash = wait_for_history(deployment, run_id, "evaluate", 1)
        kill_tree(deployment.server)
        assert not (folder / "final_model.pt").exists()

        restart_server(deployment)
        resumed_id = deployment.submit(RESILIENT_RUN, "--resume", str(folder))
        assert deployment.wait_for_run(resumed_id, STEP_TIMEOUT_S) == "finished:completed", deployment.log_tails()

        rounds = read_json(folder / "history.json")["rounds"]
        assert [entry["round"] for entry in rounds] == [1, 2], "a round was repeated or lost"
        assert rounds[0] == before_crash[0], "the completed round changed on resume"
        assert rounds[0]["train_sites"] == ["Alpha Clinic", "beta"]
        assert rounds[0]["evaluate_sites"] == ["Alpha Clinic"] and rounds[0]["evaluate_missing_sites"] == ["beta"]
        assert rounds[1]["train_sites"] == ["Alpha Clinic"] and rounds[1]["evaluate_sites"] == ["Alpha Clinic"]
        (resume_note,) = json.loads((folder / "resumes.json").read_text())
        assert resume_note["after_round"] == 1 and resume_note["remaining_rounds"] == 1
        assert (folder / "checkpoints" / "round_002.pt").is_file() and (folder / "final_model.pt").is_file()
        assert "skin-fl-client: site 'Alpha Clinic' is connected" in deployment.log("client-alpha-clinic.log")
        print(f"resilience e2e: {time.monotonic() - started:.1f} s")
