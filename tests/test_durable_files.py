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
