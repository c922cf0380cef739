"""End to end: a case corrected in the web app's store is trained on by its site in the next simulated round."""

import json
import os
import shutil

import pytest

from client.app import create_client_app
from client.site_source import SimulationSites
from client.web.store import CaseRecord, FeedbackStore, utc_now
from server.app import create_server_app, new_run_folder
from shared.config import FederationConfig, ModelConfig, PreprocessConfig, RunConfig, TrainConfig
from shared.data.demo import write_demo_dataset
from shared.data.partition import partition_natural
from shared.data.readers import read_dataset
from simulation.sites import prepare_simulated_sites
from web_support import lesion_image

pytestmark = pytest.mark.slow


def _store_case(store: FeedbackStore, image_path, *, predicted: str, label: str) -> str:
    case_id = f"{len(store.list_cases()) + 1:032x}"
    target = store.path.parent / "images" / f"{case_id}.jpg"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(image_path, target)
    probabilities = {name: 0.0 for name in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")} | {predicted: 1.0}
    store.add_cases([CaseRecord(case_id, store.relative_image_path(target), utc_now(), "dr.alice", "m@1", predicted, probabilities)])
    store.record_feedback(case_id, label=label, note="corrected at the clinic", user="dr.alice")
    return case_id


def test_a_corrected_case_joins_its_sites_training_in_the_next_round(tmp_path):
    from flwr.simulation import run_simulation

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    root = write_demo_dataset(tmp_path / "demo", format="ham10000", num_images=70, num_sites=2, seed=4)
    table = read_dataset(root, "ham10000")
    run = RunConfig(
        classes=table.classes,
        model=ModelConfig(name="resnet18", pretrained="none"),
        preprocess=PreprocessConfig(image_size=32),
        train=TrainConfig(batch_size=8, max_steps_per_epoch=2, amp="off", device="cpu", progress=False),
        federation=FederationConfig(rounds=1, min_sites=1, head_refit_steps=0),
    )
    run_folder = new_run_folder(tmp_path / "runs", "feedback")
    simulated = prepare_simulated_sites(
        partition_natural(table), run, run_folder=run_folder, cache_root=tmp_path / "cache", threads_per_site=1
    )
    manifest = json.loads(simulated.manifest_path.read_text())
    site_name = manifest["sites"][0]["name"]
    site_table = simulated.tables[site_name]

    store = FeedbackStore(tmp_path / "web" / "cases.sqlite")
    new_lesion = tmp_path / "new_lesion.jpg"
    lesion_image("df", 99).save(new_lesion, quality=90)
    _store_case(store, new_lesion, predicted="nv", label="df")
    test_image = site_table.frame.loc[site_table.frame["split"] == "test", "path"].iloc[0]
    _store_case(store, test_image, predicted="nv", label="mel")  # already a test image of this site: must not train
    manifest["sites"][0]["feedback_store"] = str(store.path)
    simulated.manifest_path.write_text(json.dumps(manifest))

    run_simulation(
        server_app=create_server_app(run, run_folder, num_sites=2),
        client_app=create_client_app(SimulationSites(simulated.manifest_path)),
        num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2, "include_dashboard": False}},
    )

    (entry,) = json.loads((run_folder / "history.json").read_text())["rounds"]
    with_feedback, without = entry["sites"][site_name], entry["sites"][manifest["sites"][1]["name"]]
    split_sizes = site_table.frame["split"].value_counts()
    assert with_feedback["train"]["feedback-examples"] == 1
    assert with_feedback["train"]["num-examples"] == split_sizes["train"] + 1
    assert with_feedback["evaluate"]["num-examples"] == split_sizes["test"]
    assert without["train"]["feedback-examples"] == 0
    # The site's own report (which stays at the site) says how many feedback cases it trained on.
    report = json.loads((simulated.manifest_path.parent / site_name / "report" / "metrics.json").read_text())
    assert report["feedback_cases_used"] == 1 and report["feedback_held_out_duplicates"] == 1
    other_report = simulated.manifest_path.parent / manifest["sites"][1]["name"] / "report" / "metrics.json"
    assert json.loads(other_report.read_text())["feedback_enabled"] is False
