"""The run folder's layout: every file's name in one place, checkpoints in round order, a damaged history named."""

import json

import pytest

from shared.errors import ConfigError
from shared.run_folder import RunFolder


def test_every_file_a_run_writes_has_one_name(tmp_path):
    folder = RunFolder(str(tmp_path))
    assert folder.path == tmp_path
    assert folder.config == tmp_path / "config.json" and folder.history == tmp_path / "history.json"
    assert folder.final_model == tmp_path / "final_model.pt" and folder.checkpoint(7) == tmp_path / "checkpoints" / "round_007.pt"
    assert folder.centralised.final_model == tmp_path / "centralised" / "final_model.pt"
    assert folder.manifest == tmp_path / "sites" / "manifest.json" and folder.privacy == tmp_path / "privacy.json"
    assert folder.resumes == tmp_path / "resumes.json" and folder.summary == tmp_path / "summary.json"
    assert folder.gan_checkpoint(12) == tmp_path / "gan" / "checkpoints" / "round_012.pt"
    assert folder.gan_grid(3) == tmp_path / "gan" / "grids" / "round_003.png"


def test_checkpoints_come_in_round_order_and_other_files_are_ignored(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.checkpoint_files() == {}
    for server_round in (10, 2, 1):
        folder.checkpoint(server_round).parent.mkdir(parents=True, exist_ok=True)
        folder.checkpoint(server_round).write_bytes(b"")
    (folder.checkpoints / "round_4.pt.tmp").write_bytes(b"")
    (folder.checkpoints / "notes.txt").write_text("")
    assert folder.checkpoint_files() == {1: folder.checkpoint(1), 2: folder.checkpoint(2), 10: folder.checkpoint(10)}


def test_the_history_reads_in_round_order_and_a_damaged_one_says_what_to_do(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.history_rounds() == [] and folder.read_history() == {}
    folder.history.write_text(json.dumps({"rounds": [{"round": 2}, {"round": 1}], "selected_round": 1}))
    assert [entry["round"] for entry in folder.history_rounds()] == [1, 2] and folder.read_history()["selected_round"] == 1
    folder.history.write_text('{"rounds": [')
    with pytest.raises(ConfigError, match="history.json is damaged .*restore it from a backup or start a new run"):
        folder.history_rounds()
    folder.gan_history.parent.mkdir()
    folder.gan_history.write_text(json.dumps({"rounds": "none"}))
    with pytest.raises(ConfigError, match="holds no list of rounds"):
        folder.gan_history_rounds()
