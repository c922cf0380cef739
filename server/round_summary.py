"""The one console line a finished round gets, from the run's own metric history."""

from __future__ import annotations

import json
from pathlib import Path

from shared.run_folder import RunFolder


def _figure(value, digits: int = 3) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def _answered(entry: dict, phase: str) -> tuple[int, int]:
    answered = len(entry.get(f"{phase}_sites", []))
    return answered, answered + len(entry.get(f"{phase}_missing_sites", []))


def round_summary_line(entry: dict, total_rounds: int) -> str:
    """'round 3/5: 3/3 sites, train loss 0.912, test loss 1.204, bal. acc 0.512, AUC 0.861, 41 s' for a history entry."""
    trained, asked = _answered(entry, "train")
    evaluated, asked_evaluate = _answered(entry, "evaluate")
    sites = f"{trained}/{asked} sites"
    if (evaluated, asked_evaluate) != (trained, asked):
        sites += f" ({evaluated}/{asked_evaluate} evaluated)"
    train, evaluate = entry.get("train") or {}, entry.get("evaluate") or {}
    seconds = (entry.get("train_wall_seconds") or 0.0) + (entry.get("evaluate_wall_seconds") or 0.0)
    return (
        f"round {entry['round']}/{total_rounds}: {sites}, train loss {_figure(train.get('train-loss'))}, "
        f"test loss {_figure(evaluate.get('loss'))}, bal. acc {_figure(evaluate.get('balanced-accuracy'))}, "
        f"AUC {_figure(evaluate.get('macro-auc'))}, {seconds:.0f} s"
    )


class RoundFollower:
    """Follows the run folders under one directory and yields the summary line of every newly finished round."""

    def __init__(self, runs_dir: Path):
        self.runs_dir = Path(runs_dir)
        self.reported: dict[Path, int] = {}
        self.seen: dict[Path, tuple[int, int]] = {}
        # Rounds already finished when the server starts were shown before; only new ones are reported.
        for folder, rounds, _ in self._finished_rounds():
            self.reported[folder] = max((entry["round"] for entry in rounds), default=0)

    def _finished_rounds(self):
        for path in sorted(self.runs_dir.glob("*/history.json")):
            try:
                status = path.stat()
                version = (status.st_mtime_ns, status.st_size)  # history.json grows with every record
                if self.seen.get(path.parent) == version:
                    continue
                self.seen[path.parent] = version
                document = json.loads(path.read_text(encoding="utf-8"))
                total = json.loads(RunFolder(path.parent).config.read_text(encoding="utf-8"))["federation"]["rounds"]
            except (OSError, ValueError, KeyError):
                continue  # a run folder being written; read it on the next poll
            yield path.parent, [entry for entry in document.get("rounds", []) if "evaluate_sites" in entry], total

    def new_lines(self) -> list[str]:
        """'RUN_FOLDER_NAME round N/M: ...' for each round evaluated since the last call."""
        lines = []
        for folder, rounds, total in self._finished_rounds():
            done = self.reported.get(folder, 0)
            for entry in rounds:
                if entry["round"] > done:
                    lines.append(f"{folder.name} {round_summary_line(entry, total)}")
                    self.reported[folder] = entry["round"]
        return lines
