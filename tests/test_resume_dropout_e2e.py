"""End to end: a site drops out of a real simulation in round 2, then the run is interrupted and resumed."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from shared.config import ModelConfig
from shared.local_training import seed_everything
from shared.models.classifier import build_classifier, load_classifier

pytestmark = pytest.mark.slow

SIM_OPTIONS = [
    "--demo-images", "90", "--rounds", "3", "--image-size", "32", "--batch-size", "16",
    "--max-steps-per-epoch", "2", "--threads-per-site", "1", "--model", "test_efficientnet", "--pretrained", "none",
    # fp32 everywhere: 'auto' may pick bf16 by a speed measurement, which would make the two attempts differ.
    "--amp", "off",
    # The handed-on model's post-hoc steps are not what resuming is about.
    "--head-refit-steps", "0",
]


def parameters(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The trainable parameters of a saved global model."""
    model, _ = load_classifier(checkpoint)
    return {name: value.detach().clone() for name, value in model.named_parameters()}


def initial_parameters() -> dict[str, torch.Tensor]:
    """The global model before round 1, as the ServerApp builds it (seed 0, random initialisation)."""
    seed_everything(0)
    model = build_classifier(ModelConfig(name="test_efficientnet", pretrained="none"), num_classes=7)
    return {name: value.detach().clone() for name, value in model.named_parameters()}


def distance(left: dict, right: dict) -> float:
    """Euclidean distance between two sets of parameters."""
    return float(torch.sqrt(sum(((left[name] - right[name]) ** 2).sum() for name in left)))


def site_failing_in_round(real_app: ClientApp, partition: int, failing_round: int) -> ClientApp:
    """The real ClientApp, except that one site raises during training in one round (a real dropout reply)."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        if context.node_config["partition-id"] == partition and message.content["config"]["server-round"] == failing_round:
            raise ConnectionError("site lost its connection during training")
        return real_app(message, context)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return real_app(message, context)

    return app


def run_first_part_with_dropout(tmp_path: Path) -> Path:
    """Three demo sites, three rounds; site 1 fails in round 2. Returns the run folder."""
    from flwr.simulation import run_simulation

    from client.app import create_client_app
    from client.site_source import SimulationSites
    from server.app import create_server_app, new_run_folder
    from simulation.cli import build_parser, load_table, run_config_from_args, simulation_resources
    from simulation.sites import partition_sites, prepare_simulated_sites

    args = build_parser().parse_args([*SIM_OPTIONS, "--cache-dir", str(tmp_path / "cache")])
    table = load_table(args)
    run = run_config_from_args(args, table.classes, 32)
    sites = partition_sites(table, partition="natural", num_sites=None, alpha=0.5, column="site", seed=run.seed)
    run_folder = new_run_folder(tmp_path / "runs", "dropout")
    simulated = prepare_simulated_sites(
        sites, run, run_folder=run_folder, cache_root=tmp_path / "cache" / "images", threads_per_site=1
    )
    _, backend = simulation_resources(len(sites), "cpu", 1)
    run_simulation(
        server_app=create_server_app(run, run_folder, num_sites=len(sites)),
        client_app=site_failing_in_round(create_client_app(SimulationSites(simulated.manifest_path)), 1, 2),
        num_supernodes=len(sites),
        backend_config=backend,
    )
    return run_folder


def test_a_site_failing_mid_run_is_recorded_and_an_interrupted_run_resumes_without_repeating_rounds(tmp_path):
    run_folder = run_first_part_with_dropout(tmp_path)
    first = json.loads((run_folder / "history.json").read_text())["rounds"]
    assert [entry["round"] for entry in first] == [1, 2, 3]
    all_sites = first[0]["train_sites"]
    assert len(all_sites) == 3 and first[0]["train_missing_sites"] == []
    dropped = [site for site in all_sites if site not in first[1]["train_sites"]]
    assert len(dropped) == 1, first[1]
    assert first[1]["train_missing_sites"] == dropped
    assert first[1]["evaluate_sites"] == all_sites and first[2]["train_sites"] == all_sites
    with (run_folder / "metrics_per_round.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows[1]["train_missing_sites"] == dropped[0]
    assert rows[1]["train_sites"] == ";".join(site for site in all_sites if site != dropped[0])

    round_1 = parameters(run_folder / "checkpoints" / "round_001.pt")
    initial = initial_parameters()
    assert distance(round_1, initial) > 0
    # The server "died" while round 2 was in flight: its checkpoint and everything later never got written.
    for number in (2, 3):
        (run_folder / "checkpoints" / f"round_{number:03d}.pt").unlink()
    (run_folder / "final_model.pt").unlink()
    resumed = subprocess.run(
        [sys.executable, "-m", "simulation.cli", "--resume", str(run_folder)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Resuming after round 1 of 3" in resumed.stdout

    history = json.loads((run_folder / "history.json").read_text())["rounds"]
    assert [entry["round"] for entry in history] == [1, 2, 3], "a round was repeated or lost"
    assert history[0] == first[0], "the completed round's record changed"
    assert history[1]["train_sites"] == all_sites and history[1]["train_missing_sites"] == []
    # The resumed round 2 trained from the round-1 checkpoint, not from the initial weights: its result
    # lies closer to the checkpoint (one round of local steps away) than to the initialisation (two).
    resumed_round_2 = parameters(run_folder / "checkpoints" / "round_002.pt")
    assert distance(resumed_round_2, round_1) < distance(resumed_round_2, initial)
    assert (run_folder / "checkpoints" / "round_003.pt").is_file() and (run_folder / "final_model.pt").is_file()
    (resume_note,) = json.loads((run_folder / "resumes.json").read_text())
    assert resume_note["after_round"] == 1 and resume_note["remaining_rounds"] == 2
