"""The site's ClientApp runner: its command line, and that it ends with the SuperNode it runs."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from client import task_runner
from shared.protocol import FLOWER_OBJECT_TRANSFER_ENV


def test_the_runner_runs_the_supernode_in_process_isolation_on_its_runtime_port():
    command = task_runner.runner_command(["flower-supernode", "--superlink", "h:1", "--port", "9101"], 9101)
    assert command[:5] == [sys.executable, "-m", "client.task_runner", "--runtime-port", "9101"]
    assert command[5:] == ["--", "flower-supernode", "--superlink", "h:1", "--port", "9101", "--isolation", "process"]


def test_the_runner_ends_with_the_supernodes_exit_code(capsys, monkeypatch):
    # A stand-in SuperNode that exits at once with code 7 (Flower's exit codes say why it gave up).
    for name in FLOWER_OBJECT_TRANSFER_ENV:
        monkeypatch.setenv(name, "2")  # Flower's default; restored after the test
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = task_runner.main(
            ["--runtime-port", "1", "--", sys.executable, "-c", "import sys; sys.exit(7)", "--isolation", "process"]
        )
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert code == 7
    # The SuperNode and the workers move 8 objects at a time.
    assert all(os.environ[name] == "8" for name in FLOWER_OBJECT_TRANSFER_ENV)
    assert "the site's code is loaded" in capsys.readouterr().out


def test_the_runner_refuses_a_supernode_command_without_process_isolation():
    with pytest.raises(SystemExit) as stopped:
        task_runner.main(["--runtime-port", "1", "--", "flower-supernode", "--superlink", "h:1"])
    assert stopped.value.code == 2
