"""What commands print: one line per round, progress lines in logs, Flower quiet and colourless off a terminal."""

import io
import json
import logging
import os
import re
import subprocess
import sys

import pytest

from server.round_summary import round_summary_line
from shared.console import PROJECT_LOGGERS, configure_console
from shared.progress import LogProgress, progress
from tensorboard_events import read_scalars

SITE_PROGRESS_LINE = re.compile(r"^\(ClientAppActor pid=\d+\) demo_clinic_\d round \d: (at|done) \d+/\d+ ")
ROUND_LINE = re.compile(
    r"^round (\d+)/(\d+): \d+/\d+ sites( \(\d+/\d+ evaluated\))?, train loss [\d.]+, test loss [\d.]+, "
    r"bal\. acc [\d.]+, AUC ([\d.]+|-), \d+ s$"
)


@pytest.fixture
def clean_logging(monkeypatch):
    """Leave Flower's logger, the project's loggers and the environment as they were."""
    for name in ("SKIN_FL_VERBOSE", "FLWR_LOG_LEVEL", "RAY_COLOR_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    flower = logging.getLogger("flwr")
    handlers, filters = list(flower.handlers), list(flower.filters)
    yield
    flower.handlers[:], flower.filters[:] = handlers, filters
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler for handler in logger.handlers if not getattr(handler, "skin_fl_console", False)]


def test_round_summary_line_from_a_history_entry_counts_the_sites_that_answered():
    entry = {
        "round": 3,
        "train": {"train-loss": 0.91234},
        "evaluate": {"loss": 1.2, "balanced-accuracy": 0.5123, "macro-auc": 0.86149},
        "train_sites": ["a", "b"], "train_missing_sites": ["c"],
        "evaluate_sites": ["a", "b", "c"], "evaluate_missing_sites": [],
        "train_wall_seconds": 30.4, "evaluate_wall_seconds": 10.3,
    }
    line = round_summary_line(entry, 5)
    assert line == "round 3/5: 2/3 sites (3/3 evaluated), train loss 0.912, test loss 1.200, bal. acc 0.512, AUC 0.861, 41 s"
    assert ROUND_LINE.match(line)
    empty = round_summary_line({"round": 1, "train": {}, "evaluate": {}, "train_sites": [], "train_missing_sites": ["a"]}, 2)
    assert empty == "round 1/2: 0/1 sites (0/0 evaluated), train loss -, test loss -, bal. acc -, AUC -, 0 s"


def test_log_progress_writes_a_line_per_interval_and_a_closing_one_only_after_a_long_phase():
    stream = io.StringIO()
    with LogProgress(4, "site_a round 1", stream=stream, interval=0.0) as bar:
        for _ in range(4):
            bar.update(1)
            bar.set_postfix(loss="0.5000")
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("site_a round 1: at 1/4 (25 %), ")
    assert lines[-1].startswith("site_a round 1: done 4/4 (100 %), loss 0.5000, ")
    assert len(lines) == 5

    quiet = io.StringIO()
    with LogProgress(1000, "short phase", stream=quiet, interval=3600.0) as bar:
        bar.update(1000)
    assert quiet.getvalue() == ""
    assert list(progress(3, "off", enabled=False, iterable=[1, 2, 3])) == [1, 2, 3]


def test_flower_is_quiet_and_colourless_off_a_terminal_and_verbose_drops_only_unactionable_warnings(clean_logging):
    from flwr.common.logger import ConsoleHandler, log, warn_deprecated_feature

    flower = logging.getLogger("flwr")
    stream = io.StringIO()
    handler = ConsoleHandler(colored=True, stream=stream)
    handler.setLevel(logging.INFO)
    flower.handlers[:] = [handler]

    configure_console(verbose=False)
    assert os.environ["FLWR_LOG_LEVEL"] == "ERROR" and os.environ["SKIN_FL_VERBOSE"] == "0"
    log(logging.INFO, "aggregate_train: Received 3 results")
    log(logging.ERROR, "ClientApp raised an exception")
    assert [line.split() for line in stream.getvalue().splitlines()] == [["ERROR", ":", "ClientApp", "raised", "an", "exception"]]

    configure_console(verbose=True)
    warn_deprecated_feature("The `run_simulation` function is deprecated and will be removed")
    log(logging.INFO, "[ROUND 1/2]")
    assert "DEPRECATED" not in stream.getvalue() and "[ROUND 1/2]" in stream.getvalue()
    assert "\x1b" not in stream.getvalue()


@pytest.mark.slow
def test_skin_fl_sim_prints_only_its_own_lines_one_per_round_and_writes_tensorboard_events(tmp_path):
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    environment.pop("SKIN_FL_VERBOSE", None)
    environment.pop("FLWR_LOG_LEVEL", None)
    result = subprocess.run(
        [
            sys.executable, "-m", "simulation.cli", "--demo-images", "90", "--rounds", "2", "--image-size", "32",
            "--batch-size", "16", "--max-steps-per-epoch", "2", "--tensorboard", "--head-refit-steps", "2",
            "--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"),
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=environment,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    lines = output.splitlines()
    assert len(lines) < 40, f"{len(lines)} lines; stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "\x1b" not in output
    for foreign in ("INFO :", "WARNING :", "ERROR :", "DEPRECATED", "FutureWarning", "Manually terminating"):
        assert foreign not in output, f"{foreign!r} in:\n{output}"
    # A site's lines reach the console through Ray, which names the actor; on a slow machine they are progress lines.
    for line in lines:
        if "pid=" in line:
            assert SITE_PROGRESS_LINE.match(line), line
    rounds = [ROUND_LINE.match(line) for line in lines if line.startswith("round ")]
    assert [(match.group(1), match.group(2)) for match in rounds] == [("1", "2"), ("2", "2")], output
    assert "overall" in result.stdout and "skin-fl hands on round" in result.stdout
    assert "the classification layer" in result.stdout  # the refit says what it did

    (run_folder,) = (tmp_path / "runs").iterdir()
    history = json.loads((run_folder / "history.json").read_text())["rounds"]
    scalars = read_scalars(run_folder / "tensorboard")
    assert scalars["test/balanced_accuracy"] == pytest.approx({entry["round"]: entry["evaluate"]["balanced-accuracy"] for entry in history})
    assert scalars["sites/trained"] == {1: 3.0, 2: 3.0}


def test_the_coordinator_follows_run_folders_and_reports_each_new_round_once(tmp_path):
    from server.history import MetricHistory, write_json_atomically
    from server.round_summary import RoundFollower

    old = tmp_path / "20260101-000000-run-1"
    old.mkdir()
    write_json_atomically(old / "config.json", {"federation": {"rounds": 2}})
    finished = MetricHistory(old)
    finished.record_train(1, {"train-loss": 1.0}, {"a": {}}, 1.0)
    finished.record_evaluate(1, {"loss": 2.0, "balanced-accuracy": 0.5, "macro-auc": 0.7}, {"a": {}}, 1.0)
    follower = RoundFollower(tmp_path)
    assert follower.new_lines() == []  # rounds finished before the server started were shown then

    folder = tmp_path / "20260101-000100-run-2"
    folder.mkdir()
    write_json_atomically(folder / "config.json", {"federation": {"rounds": 3}})
    history = MetricHistory(folder)
    history.record_train(1, {"train-loss": 0.9}, {"a": {}, "b": {}}, 4.0, missing=["c"])
    assert follower.new_lines() == []  # trained, not yet evaluated
    history.record_evaluate(1, {"loss": 1.5, "balanced-accuracy": 0.4, "macro-auc": 0.8}, {"a": {}, "b": {}}, 2.0, missing=["c"])
    assert follower.new_lines() == [
        "20260101-000100-run-2 round 1/3: 2/3 sites, train loss 0.900, test loss 1.500, bal. acc 0.400, AUC 0.800, 6 s"
    ]
    assert follower.new_lines() == []
