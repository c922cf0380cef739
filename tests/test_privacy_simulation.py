"""End to end: a DP-SGD simulation (GAN and classifier) that stops at its epsilon budget, and what a site actually sends."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.serde import recorddict_to_proto

from shared.models.classifier import load_classifier

pytestmark = pytest.mark.slow

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def test_dp_simulation_reports_epsilon_every_round_and_stops_cleanly_at_the_budget(tmp_path):
    budget = 4.0
    result = subprocess.run(
        [
            sys.executable, "-m", "simulation.cli",
            "--demo-images", "120", "--rounds", "4", "--image-size", "32", "--batch-size", "8",
            "--max-steps-per-epoch", "2", "--balance", "none", "--pretrained", "none",
            "--privacy", "local", "--dp-recipe", "fine-tune", "--noise-multiplier", "1.0", "--target-epsilon", str(budget),
            "--target-delta", "1e-3", "--max-grad-norm", "1.0",
            "--gan-rounds", "1", "--gan-image-size", "32", "--gan-channels", "8", "--gan-local-steps", "2", "--gan-batch-size", "8",
            "--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"),
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_folder,) = (tmp_path / "runs").iterdir()
    rounds = json.loads((run_folder / "history.json").read_text())["rounds"]
    privacy = json.loads((run_folder / "privacy.json").read_text())

    (gan_round,) = json.loads((run_folder / "gan" / "history.json").read_text())["rounds"]
    gan_epsilon = gan_round["privacy"]["epsilon_max"]
    assert 0 < gan_epsilon < budget and len(gan_round["privacy"]["sites"]) == 3
    assert all(0 < site["epsilon"] <= gan_epsilon for site in gan_round["sites"].values())

    completed = [entry["round"] for entry in rounds]
    assert 1 <= len(completed) < 4 and completed == list(range(1, len(completed) + 1))
    epsilons = [entry["train"]["epsilon"] for entry in rounds]
    assert all(gan_epsilon < epsilon <= budget for epsilon in epsilons) and epsilons == sorted(epsilons)
    for entry in rounds:
        assert entry["privacy"]["epsilon_max"] == pytest.approx(entry["train"]["epsilon"])
        assert len(entry["privacy"]["sites"]) == 3
    assert rounds[-1]["privacy"]["epsilon_next_round_max"] > budget
    assert privacy["stopped_early"]["before_round"] == len(completed) + 1
    assert privacy["epsilon_spent_max"] == pytest.approx(epsilons[-1])
    assert privacy["settings"]["noise_multiplier"] == 1.0 and privacy["epsilon_budget"] == budget
    assert "stopped early: privacy budget reached" in result.stdout
    assert f"the run stops after {len(completed)} of 4 rounds" in result.stdout
    ledgers = sorted((run_folder / "sites" / "privacy").glob("*/*.json"))
    assert len(ledgers) == 3
    for ledger in ledgers:
        assert [entry["round"] for entry in json.loads(ledger.read_text())["rounds"]] == ["gan-1", *completed]
    assert [entry["round"] for entry in privacy["rounds"]] == ["gan-1", *completed]
    model, saved = load_classifier(run_folder / "final_model.pt")
    assert saved.metadata["stopped_by_privacy_budget"].startswith("privacy budget reached")
    assert saved.metadata["completed_rounds"] == len(completed)


class CapturingClientApp:
    """Builds a ClientApp whose Flower mod pickles every reply a site sends into a folder."""

    def __init__(self, manifest_path: Path, capture_folder: Path) -> None:
        self.manifest_path = manifest_path
        self.capture_folder = capture_folder

    def build(self) -> ClientApp:
        from client.app import create_client_app
        from client.site_source import SimulationSites

        inner = create_client_app(SimulationSites(self.manifest_path))
        folder = self.capture_folder

        def capture(message: Message, context: Context, call_next) -> Message:
            reply = call_next(message, context)
            number = len(list(folder.iterdir()))
            payload = recorddict_to_proto(reply.content).SerializeToString()
            (folder / f"{number:04d}-{message.metadata.message_type}-{context.node_id}.pb").write_bytes(payload)
            (folder / f"{number:04d}.pickle").write_bytes(pickle.dumps(reply.content))
            return reply

        outer = ClientApp(mods=[capture])

        @outer.train()
        def train(message: Message, context: Context) -> Message:
            return inner(message, context)

        @outer.train("gan")
        def train_gan(message: Message, context: Context) -> Message:
            return inner(message, context)

        @outer.evaluate()
        def evaluate(message: Message, context: Context) -> Message:
            return inner(message, context)

        return outer


def _strings_in(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [text for item in value for text in _strings_in(item)]
    return []


def test_nothing_but_weights_and_aggregate_metrics_leaves_a_site(tmp_path):
    from flwr.simulation import run_simulation

    from server.app import create_server_app
    from shared.config import RunConfig
    from shared.data.demo import write_demo_dataset
    from shared.data.readers import read_dataset
    from shared.gan.models import build_gan, gan_to_arrays
    from shared.models.classifier import build_classifier
    from shared.privacy.model_preparation import prepare_for_private_training
    from simulation.sites import partition_sites, prepare_simulated_sites

    root = write_demo_dataset(tmp_path / "data", format="ham10000", num_images=90, seed=3)
    table = read_dataset(root, "ham10000")
    run = RunConfig(
        classes=CLASSES,
        model={"name": "tf_efficientnet_lite0", "pretrained": "none"},
        preprocess={"image_size": 32},
        train={"batch_size": 8, "balance": "none", "max_steps_per_epoch": 1, "progress": False},
        federation={"rounds": 1, "min_sites": 1},
        privacy={"mode": "local", "target_epsilon": 8.0, "noise_multiplier": 2.0, "target_delta": 1e-3, "max_grad_norm": 1.0,
                 "head_steps_per_round": 1},
        gan={"rounds": 1, "image_size": 32, "channels": 8, "latent_dim": 16, "local_steps": 2, "batch_size": 8},
        report={"gallery_per_class": 0},
    )
    sites = partition_sites(table, partition="natural", num_sites=None, alpha=0.5, column="site", seed=0)
    run_folder = tmp_path / "run"
    simulated = prepare_simulated_sites(
        sites, run, run_folder=run_folder, cache_root=tmp_path / "cache", threads_per_site=1
    )
    capture_folder = tmp_path / "sent"
    capture_folder.mkdir()
    run_simulation(
        server_app=create_server_app(run, run_folder, num_sites=len(sites)),
        client_app=CapturingClientApp(simulated.manifest_path, capture_folder).build(),
        num_supernodes=len(sites),
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2, "include_dashboard": False}},
    )

    replies = [pickle.loads(path.read_bytes()) for path in sorted(capture_folder.glob("*.pickle"))]
    wire = b"".join(path.read_bytes() for path in sorted(capture_folder.glob("*.pb")))
    kinds = [path.name.split("-")[1] for path in sorted(capture_folder.glob("*.pb"))]
    assert kinds.count("train") == len(sites) and kinds.count("train.gan") == len(sites), kinds
    assert kinds.count("evaluate") >= len(sites), kinds

    frame = table.frame
    identifiers = set(frame["image_id"]) | set(frame["group"]) | {Path(path).name for path in frame["path"]}
    identifiers |= {Path(path).stem for path in frame["path"]} | {str(root), str(tmp_path)}
    for identifier in identifiers:
        assert identifier.encode() not in wire, f"{identifier} left a site"
    # Image files: their header and a stretch of their compressed data (3-byte magic numbers alone
    # turn up by chance in megabytes of float weights).
    for path in frame["path"]:
        content = Path(path).read_bytes()
        assert content[:64] not in wire and content[1000:1064] not in wire, f"bytes of {Path(path).name} left a site"
    # Raw pixels: no run of 64 bytes from any cached training image appears in what was sent.
    for name, images in simulated.images.items():
        pixels = np.asarray(images.images)
        for row in range(0, len(pixels), 7):
            chunk = pixels[row].tobytes()[1024:1088]
            assert chunk not in wire, f"pixels of a {name} image left the site"

    classifier_reference = prepare_for_private_training(build_classifier(run.model, num_classes=len(CLASSES)), run.privacy.prepared_stages).state_dict()
    gan_reference = {name: torch.as_tensor(array) for name, array in gan_to_arrays(*build_gan(run.gan, len(CLASSES))).items()}
    num_classes = len(CLASSES)
    for content in replies:
        assert set(content.keys()) <= {"arrays", "metrics", "site"}
        for record in content.array_records.values():
            reference = gan_reference if set(record.keys()) == set(gan_reference) else classifier_reference
            assert set(record.keys()) == set(reference), "only the models' own tensors are sent"
            for key, array in record.items():
                assert tuple(array.shape) == tuple(reference[key].shape)
        for record in content.config_records.values():
            assert set(record.keys()) <= {"name", "precision", "device"}
            for text in _strings_in(list(record.values())):
                assert text in sites or text in ("fp32", "bf16") or text.startswith("cpu") or text.startswith("cuda")
        for record in content.metric_records.values():
            for key, value in record.items():
                if isinstance(value, list):
                    # Per-class aggregates (one value per class) or the confusion counts (classes x classes).
                    assert len(value) in (num_classes, num_classes * num_classes), key
                else:
                    assert isinstance(value, (int, float)), key
            if "train-loss" in record or "discriminator-loss" in record:
                assert record["epsilon"] > 0 and record["num-examples"] > 0
            assert "frechet-distance" not in record, "a summary of the real images' features left a site"
    per_site_examples = {len(images.select("test")) for images in simulated.images.values()}
    evaluated = [record["num-examples"] for content in replies for record in content.metric_records.values() if "confusion-matrix" in record]
    assert set(evaluated) <= per_site_examples and sum(sum(r["confusion-matrix"]) for c in replies for r in c.metric_records.values() if "confusion-matrix" in r) == sum(evaluated)
