"""What a site's replies may carry: allow-listed records and keys, and for errors a fixed code, never the file name that failed."""

import json
import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from PIL import Image

from client.app import create_client_app
from client.gan_handlers import synthesis_reply_metrics
from client.reply_guard import guard_replies
from client.site_source import NodeConfigSite
from server.gan_phase import _exchange
from server.screened_grid import ScreenedGrid, screened
from server.site_reports import request_site_reports
from shared.config import RoundInstructions, RunConfig
from shared.errors import SkinFLError
from shared.models.classifier import build_classifier
from shared.protocol import (
    GAN_SYNTHESISE_MESSAGE,
    GAN_TRAIN_MESSAGE,
    INSTRUCTIONS_KEY,
    REPLY_ALLOW_LISTS,
    RUN_KEY,
    SITE_ERRORS,
    ScreenedSiteError,
    site_error_reason,
)
from shared.weights import model_to_arrays
from site_loopback import LoopbackGrid, server_task_identity

PATIENT_FILE = "DOE_JOHN_MRN4711_1961-03-02.jpg"
IDENTIFYING = ("DOE_JOHN", "MRN4711", "1961-03-02")


@pytest.fixture(autouse=True)
def _as_the_server_app():
    with server_task_identity():
        yield


def _site_with_a_corrupt_patient_file(root):
    """A folder-format export: four good images per class and one truncated file named by patient."""
    rng = np.random.default_rng(0)
    for label in ("mel", "nv"):
        (root / label).mkdir(parents=True)
        for index in range(4):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / label / f"img_{index}.jpg")
    good = (root / "mel" / "img_0.jpg").read_bytes()
    (root / "mel" / PATIENT_FILE).write_bytes(good[: len(good) // 3])
    return root


def _run() -> RunConfig:
    return RunConfig(
        classes=["mel", "nv"], model={"name": "resnet18", "pretrained": "none"}, preprocess={"image_size": 32},
        train={"batch_size": 4, "device": "cpu", "progress": False}, federation={"rounds": 1, "min_sites": 1},
    )


def _loopback(tmp_path) -> LoopbackGrid:
    data = _site_with_a_corrupt_patient_file(tmp_path / "exports")
    node_config = {"site": "clinic-a", "data-dir": str(data), "format": "folder", "cache-dir": str(tmp_path / "cache")}
    return LoopbackGrid(create_client_app(NodeConfigSite()), {7: node_config})


def _train_message(run: RunConfig) -> Message:
    arrays = model_to_arrays(build_classifier(run.model, num_classes=len(run.classes)))
    content = RecordDict({
        "arrays": ArrayRecord({name: Array(value) for name, value in arrays.items()}),
        "config": ConfigRecord({INSTRUCTIONS_KEY: RoundInstructions.for_round(run, 1).model_dump_json()}),
    })
    return Message(content, dst_node_id=7, message_type="train")


def _assert_nothing_identifying(text: str, tmp_path) -> None:
    for identifier in (*IDENTIFYING, PATIENT_FILE, str(tmp_path)):
        assert identifier not in text, f"{identifier!r} in {text!r}"


def test_a_corrupt_patient_file_becomes_a_fixed_code_with_the_full_text_only_in_the_sites_log(tmp_path, caplog):
    grid = _loopback(tmp_path)
    with caplog.at_level(logging.ERROR, logger="client.reply_guard"):
        (reply,) = grid.send_and_receive([_train_message(_run())])

    assert reply.has_error()
    kept = ScreenedSiteError.of(reply.error.reason)
    assert kept.code == "site-data" and reply.error.reason == site_error_reason("site-data", kept.reference)
    _assert_nothing_identifying(reply.error.reason, tmp_path)
    # The site's own log has the whole story under the same reference, so its IT staff can fix it.
    (record,) = [record for record in caplog.records if kept.reference in record.getMessage()]
    assert PATIENT_FILE in record.getMessage() and record.exc_info is not None


def test_the_server_keeps_and_logs_only_the_code_of_a_failing_site(tmp_path, caplog):
    run = _run()
    grid = ScreenedGrid(_loopback(tmp_path))
    final = ArrayRecord({name: Array(value) for name, value in model_to_arrays(build_classifier(run.model, 2)).items()})
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        assert request_site_reports(grid, run, final, tmp_path / "run") is None
        with pytest.raises(SkinFLError, match="site-data") as raised:
            _exchange(grid, run, [7], RecordDict({"config": ConfigRecord({"run": run.model_dump_json()})}), "query.gan_synthesise", "gan-synthesis")
    server_log = "\n".join(record.getMessage() for record in caplog.records if record.name.startswith(("server", "flwr")))
    assert "site-data" in server_log and "reference" in server_log
    _assert_nothing_identifying(server_log + str(raised.value), tmp_path)
    written = "".join(path.read_text() for path in (tmp_path / "run").rglob("*") if path.is_file()) if (tmp_path / "run").exists() else ""
    _assert_nothing_identifying(written, tmp_path)


def test_free_error_text_from_an_older_site_or_from_flower_is_dropped_at_the_server():
    request = Message(RecordDict(), dst_node_id=3, message_type="train")
    flower_style = Message(Error(code=2, reason=f"<class 'DataError'>:<'image file /data/{PATIENT_FILE} is corrupt'>"), reply_to=request)
    kept = screened(flower_style)
    assert kept.error.code == 2 and "unrecognised form" in kept.error.reason
    _assert_nothing_identifying(kept.error.reason, "/data")
    # A well-formed site error passes unchanged; a known prefix with extra text does not.
    good = site_error_reason("site-privacy-policy", "0123456789ab")
    assert screened(Message(Error(code=2, reason=good), reply_to=request)).error.reason == good
    padded = good.replace("; the site's log", f" ({PATIENT_FILE}); the site's log")
    assert ScreenedSiteError.of(padded).reason == site_error_reason("site-privacy-policy", "0123456789ab")
    assert set(SITE_ERRORS) >= {"site-data", "site-config", "site-model", "site-internal", "site-reply-refused"}
    assert json.dumps(SITE_ERRORS, default=str)


def _guarded(message: Message, records: dict) -> Message:
    """What leaves the site when a handler answers `message` with `records`."""
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    return guard_replies(message, context, lambda message, context: Message(RecordDict(records), reply_to=message))


def _gan_message(private: bool) -> Message:
    privacy = {"mode": "local", "noise_multiplier": 1.0, "target_delta": 1e-3, "max_grad_norm": 1.0} if private else {"mode": "off"}
    run = RunConfig.model_validate(_run().model_dump() | {"privacy": privacy, "train": {"balance": "none", "progress": False}})
    content = RecordDict({
        "arrays": ArrayRecord({"generator.weight": Array(np.zeros((4, 3), np.float32))}),
        "config": ConfigRecord({RUN_KEY: run.model_dump_json()}),
    })
    return Message(content, dst_node_id=7, message_type=GAN_TRAIN_MESSAGE)


def _refused(reply: Message) -> bool:
    return reply.has_error() and ScreenedSiteError.of(reply.error.reason).code == "site-reply-refused"


def test_a_reply_leaves_only_with_what_its_message_types_allow_list_permits():
    message = _train_message(_run())
    arrays = message.content["arrays"]
    good = {"arrays": arrays, "metrics": MetricRecord({"num-examples": 8, "train-loss": 0.5}), "site": ConfigRecord({"name": "clinic-a"})}
    assert not _guarded(message, good).has_error()
    assert _refused(_guarded(message, {**good, "metrics": MetricRecord({"num-examples": 8, "patients-over-80": 3})}))
    assert _refused(_guarded(message, {**good, "metrics": MetricRecord({"num-examples": [8, 9]})}))
    assert _refused(_guarded(message, {**good, "site": ConfigRecord({"name": "clinic-a", "data-dir": "/exports"})}))
    assert _refused(_guarded(message, {**good, "extra": ConfigRecord({"name": "x"})}))
    first = next(iter(arrays.keys()))
    assert _refused(_guarded(message, {**good, "arrays": ArrayRecord({"pixels": Array(np.zeros((32, 32, 3), np.uint8))})}))
    reshaped = ArrayRecord({first: Array(np.zeros((1, 2, 3), np.float32))})
    assert _refused(_guarded(message, {**good, "arrays": reshaped}))
    # A summary of the real images outside the DP budget: sent from a run without DP only.
    gan = {"arrays": ArrayRecord({"generator.weight": Array(np.ones((4, 3), np.float32))}),
           "metrics": MetricRecord({"num-examples": 8, "frechet-distance": 12.5})}
    assert not _guarded(_gan_message(private=False), gan).has_error()
    assert _refused(_guarded(_gan_message(private=True), gan))
    # A message type the protocol does not list gets no reply.
    unknown = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=7, message_type="query.export")
    assert _refused(_guarded(unknown, {"metrics": MetricRecord({"num-examples": 1})}))


def test_synthesis_sends_totals_only_and_no_rejection_counts_from_a_private_run():
    report = {"real": {"mel": 5, "nv": 40}, "wanted": {"mel": 15, "nv": 0}, "added": {"mel": 12, "nv": 0}, "candidates": 30,
              "rejected": {"unrealistic": 8, "memorised": 1, "near_duplicate": 9},
              "thresholds": {"memorisation": 0.1, "duplicate": 0.1, "real_nn_percentiles": [0.1, 0.2]}}
    assert synthesis_reply_metrics(report, private=False) == {
        "num-examples": 45, "synthetic-images": 12, "candidates": 30,
        "rejected-unrealistic": 8, "rejected-memorised": 1, "rejected-near-duplicate": 9,
    }
    assert synthesis_reply_metrics(report, private=True) == {"num-examples": 45, "synthetic-images": 12}
    allowed = REPLY_ALLOW_LISTS[GAN_SYNTHESISE_MESSAGE]
    assert set(synthesis_reply_metrics(report, private=False)) == allowed.metric_keys(private=False)
