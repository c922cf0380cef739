"""End to end: a DP-SGD simulation (GAN and classifier) that stops at its epsilon budget, and what a site actually sends (with and without DP)."""

import json
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import recorddict_to_proto

from shared.calibration import TEMPERATURES
from shared.gan.models import build_gan, gan_to_arrays
from shared.head_refit import head_parameter_names
from shared.models.classifier import build_classifier, load_classifier
from shared.privacy.model_preparation import prepare_for_private_training
from shared.protocol import REPLY_ALLOW_LISTS
from shared.weights import model_to_arrays

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
    """Builds a ClientApp whose Flower mod pickles every reply a site sends, for every message type the protocol lists."""

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
            # One name per message: sites reply in parallel, so a running count could name two replies alike.
            number = message.metadata.message_id
            kind = message.metadata.message_type
            # The reply as serialised for the wire, and apart from its tensors (the small part every row of every image is sought in).
            failed = reply.has_error()
            wire = str(reply.error.reason).encode() if failed else recorddict_to_proto(reply.content).SerializeToString()
            (folder / f"{number}-{kind}-{context.node_id}.pb").write_bytes(wire)
            without_tensors = (
                RecordDict() if failed else RecordDict({name: record for name, record in reply.content.items() if not isinstance(record, ArrayRecord)})
            )
            (folder / f"{number}-{kind}-{context.node_id}.small").write_bytes(recorddict_to_proto(without_tensors).SerializeToString())
            (folder / f"{number}.pickle").write_bytes(pickle.dumps((kind, reply.content if not reply.has_error() else None)))
            return reply

        outer = ClientApp(mods=[capture])
        for message_type in REPLY_ALLOW_LISTS:
            category, _, action = message_type.partition(".")
            getattr(outer, category)(action or "default")(lambda message, context: inner(message, context))
        return outer


def _strings_in(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [text for item in value for text in _strings_in(item)]
    return []


@pytest.mark.parametrize("privacy", ["local", "off"])
def test_nothing_but_weights_and_allow_listed_aggregates_leaves_a_site(tmp_path, privacy):
    from flwr.simulation import run_simulation

    from server.app import create_server_app
    from shared.config import RunConfig
    from shared.data.demo import write_demo_dataset
    from shared.data.readers import read_dataset
    from simulation.sites import partition_sites, prepare_simulated_sites

    root = write_demo_dataset(tmp_path / "data", format="ham10000", num_images=90, seed=3)
    table = read_dataset(root, "ham10000")
    private = privacy == "local"
    sites = partition_sites(table, partition="natural", num_sites=None, alpha=0.5, column="site", seed=0)
    run = RunConfig(
        classes=CLASSES,
        model={"name": "tf_efficientnet_lite0", "pretrained": "none"},
        preprocess={"image_size": 32},
        train={"batch_size": 8, "balance": "none" if private else "global", "max_steps_per_epoch": 1, "progress": False},
        federation={
            "rounds": 1, "min_sites": len(sites), "calibrate": True, "batch_norm": "average" if private else "recalibrate",
            **({} if private else {"head_refit_steps": 2}),
        },
        privacy={"mode": "local", "target_epsilon": 8.0, "noise_multiplier": 1.0, "target_delta": 1e-3, "max_grad_norm": 1.0,
         "head_steps_per_round": 1}
        if private
        else {"mode": "off"},
        gan={"rounds": 1, "image_size": 32, "channels": 8, "latent_dim": 16, "local_steps": 2, "batch_size": 8, "augment": not private},
        report={"gallery_per_class": 0},
    )
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

    captured = [pickle.loads(path.read_bytes()) for path in sorted(capture_folder.glob("*.pickle"))]
    assert all(content is not None for _, content in captured), "a site failed: see the site log above"
    kinds = [kind for kind, _ in captured]
    # A private run may not select synthetic images (that compares them with the real ones outside the budget): no synthesis.
    not_private_only = {"query.batch_norm", "query.gan_synthesise", "query.class_counts", "query.head_gradient"}
    expected = {"train", "train.gan", "evaluate", "query.calibrate", "query.prior"} | (not_private_only if not private else set())
    assert set(kinds) == expected and all(kinds.count(kind) >= len(sites) for kind in expected), Counter(kinds)
    wire = b"".join(path.read_bytes() for path in sorted(capture_folder.glob("*.pb")))
    small = b"".join(path.read_bytes() for path in sorted(capture_folder.glob("*.small")))

    frame = table.frame
    identifiers = set(frame["image_id"]) | set(frame["group"]) | {Path(path).name for path in frame["path"]}
    identifiers |= {Path(path).stem for path in frame["path"]} | {str(root), str(tmp_path), root.name}
    for identifier in identifiers:
        assert identifier.encode() not in wire, f"{identifier} left a site"
    # Image files: their header and a stretch of their compressed data.
    for path in frame["path"]:
        content = Path(path).read_bytes()
        assert content[:64] not in wire and content[1000:1064] not in wire, f"bytes of {Path(path).name} left a site"
    # Raw pixels of every cached image: every pixel row in everything but the tensors, two rows of each image in the tensors.
    for name, images in simulated.images.items():
        for image in np.asarray(images.images):
            rows = [row.tobytes() for row in image]
            assert not any(row in small for row in rows), f"pixels of a {name} image left the site"
            assert rows[8] not in wire and rows[20] not in wire, f"pixels of a {name} image left the site"

    classifier_reference = build_classifier(run.model, num_classes=len(CLASSES))
    if private:
        classifier_reference = prepare_for_private_training(classifier_reference, run.privacy.prepared_stages)
    classifier_shapes = {name: tuple(array.shape) for name, array in model_to_arrays(classifier_reference).items()}
    gan_shapes = {name: tuple(array.shape) for name, array in gan_to_arrays(*build_gan(run.gan, len(CLASSES))).items()}
    num_classes = len(CLASSES)
    for kind, content in captured:
        allowed = REPLY_ALLOW_LISTS[kind]
        assert set(content.keys()) <= allowed.record_names(), (kind, list(content.keys()))
        metrics = content["metrics"]
        assert set(metrics.keys()) <= allowed.metric_keys(private), (kind, sorted(metrics.keys()))
        assert "num-examples" in metrics and metrics["num-examples"] > 0
        if private:
            assert not set(metrics.keys()) & allowed.non_private_metrics, kind
        for key, value in metrics.items():
            if key in allowed.list_metrics:
                # Per-class aggregates, the confusion counts (classes x classes), or one value per calibration temperature.
                assert len(value) in (num_classes, num_classes * num_classes, len(TEMPERATURES)), key
            else:
                assert isinstance(value, (int, float)), key
        for name, record in content.array_records.items():
            assert name in allowed.array_records, (kind, name)
            reference = gan_shapes if kind == "train.gan" else classifier_shapes
            for key, array in record.items():
                assert tuple(array.shape) == reference[key], (kind, key)
            if kind == "query.head_gradient":
                assert set(record.keys()) == set(head_parameter_names(classifier_reference)), "only the layer's gradient is sent"
            elif kind != "query.batch_norm":
                assert set(record.keys()) == set(reference), "only the models' own tensors are sent"
        for record in content.config_records.values():
            assert set(record.keys()) <= allowed.site
            for text in _strings_in(list(record.values())):
                assert text in sites or text in ("fp32", "bf16") or text.startswith("cpu") or text.startswith("cuda")
        if kind in ("train", "train.gan") and private:
            assert metrics["epsilon"] > 0
    synthesised = [content["metrics"] for kind, content in captured if kind == "query.gan_synthesise"]
    assert all("synthetic-images" in metrics for metrics in synthesised)
    # The per-class detail stays at the site, in its own selection report beside its synthetic set.
    site_reports = sorted((simulated.manifest_path.parent / "synthetic").glob("*/*.selection.json"))
    assert len(site_reports) == (0 if private else len(sites)) and all("real" in json.loads(path.read_text()) for path in site_reports)
    per_site_examples = {len(images.select("test")) for images in simulated.images.values()}
    evaluated = [content["metrics"]["num-examples"] for kind, content in captured if kind == "evaluate"]
    assert set(evaluated) <= per_site_examples
    assert sum(sum(content["metrics"]["confusion-matrix"]) for kind, content in captured if kind == "evaluate") == sum(evaluated)
