"""Crash-safe writes: the old file or the whole new one, never a half-written or stray temporary file."""

import json
import os
import stat

import pytest

from shared.durable_files import replaced_atomically, write_bytes_atomically, write_json_atomically


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "history.json"
    write_json_atomically(target, {"rounds": [1]})
    with pytest.raises(RuntimeError, match="disk full"):
        with replaced_atomically(target) as temporary:
            temporary.write_text('{"rounds": [1, 2')
            raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"rounds": [1]}
    assert os.listdir(tmp_path) == ["history.json"]


def test_an_owner_only_file_is_owner_only_from_its_first_byte(tmp_path):
    target = tmp_path / "nested" / "ledger.json"
    write_bytes_atomically(target, b"secret", mode=0o600)
    assert target.read_bytes() == b"secret" and stat.S_IMODE(target.stat().st_mode) == 0o600
    write_bytes_atomically(target, b"shorter", mode=0o600)
    assert target.read_bytes() == b"shorter"


def test_checkpoints_history_ledgers_and_case_images_are_flushed_file_and_folder(tmp_path, monkeypatch):
    from client.web.uploads import CheckedUpload, store_upload
    from server.history import MetricHistory
    from shared.config import ModelConfig, PreprocessConfig
    from shared.models.classifier import build_classifier, save_classifier
    from shared.privacy.accounting import PrivacyLedger

    flushed = []
    real_fsync = os.fsync

    def recording_fsync(descriptor):
        flushed.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    model = build_classifier(ModelConfig(name="test_efficientnet", pretrained="none"), num_classes=2)
    save_classifier(tmp_path / "checkpoints" / "round_001.pt", model, model_name="test_efficientnet", classes=["a", "b"], preprocess=PreprocessConfig())
    history = MetricHistory(tmp_path)
    history.record_train(1, {"train-loss": 1.0}, {"A": {"train-loss": 1.0}}, 1.0)
    PrivacyLedger.open(tmp_path / "privacy", "A", "run", 1e-5).record(1, 1.0, 0.1, 2)
    store_upload(tmp_path / "images", "case1", CheckedUpload(0, b"\xff\xd8jpeg", "JPEG", 1, 1))
    for written in ("checkpoints", "history.json", "privacy/A", "images"):
        folder = str(tmp_path / written) if "." not in written else str(tmp_path)
        assert folder in flushed, f"the folder of {written} was not flushed"
    assert any(path.endswith("round_001.pt.tmp") or ".round_001.pt." in path for path in flushed)
    assert any(".case1.jpg." in path for path in flushed) and any(".run.json." in path for path in flushed)
