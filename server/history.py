"""The run folder's metric history: per-round aggregates and per-site metrics, as JSON and CSV."""

from __future__ import annotations

import csv
from pathlib import Path

from shared.durable_files import replaced_atomically, write_json_atomically
from shared.json_values import finite_or_none
from shared.run_folder import RunFolder


class MetricHistory:
    """Per-round records of a run, saved to `history.json` and two CSV files after every change."""

    def __init__(self, run_folder: Path):
        self.run_folder = Path(run_folder)
        self.rounds: dict[int, dict] = {}
        self.selected_round: int | None = None
        """The round whose global model the run hands on (set at the end of the run)."""

    @classmethod
    def load(cls, run_folder: Path) -> MetricHistory:
        """The history a run folder's history.json holds (empty when there is none yet)."""
        history = cls(run_folder)
        document = RunFolder(run_folder).read_history()
        history.rounds = {entry["round"]: entry for entry in document.get("rounds", [])}
        history.selected_round = document.get("selected_round")
        return history

    def _round(self, server_round: int) -> dict:
        return self.rounds.setdefault(server_round, {"round": server_round, "train": {}, "evaluate": {}, "sites": {}})

    def record_train(
        self, server_round: int, aggregate: dict, per_site: dict[str, dict], seconds: float, missing: list[str] = ()
    ) -> None:
        """Store the aggregated and per-site training metrics of a round, and the asked sites that did not reply."""
        entry = self._round(server_round)
        entry["train"] = {key: finite_or_none(value) for key, value in aggregate.items()}
        entry["train_sites"] = sorted(per_site)
        entry["train_missing_sites"] = sorted(missing)
        entry["train_wall_seconds"] = seconds
        for site, metrics in per_site.items():
            entry["sites"].setdefault(site, {})["train"] = {k: finite_or_none(v) for k, v in metrics.items()}
        self.save()

    def record_evaluate(
        self, server_round: int, aggregate: dict, per_site: dict[str, dict], seconds: float, missing: list[str] = ()
    ) -> None:
        """Store the aggregated and per-site evaluation metrics of a round, and the asked sites that did not reply."""
        entry = self._round(server_round)
        entry["evaluate"] = {key: finite_or_none(value) for key, value in aggregate.items()}
        entry["evaluate_sites"] = sorted(per_site)
        entry["evaluate_missing_sites"] = sorted(missing)
        entry["evaluate_wall_seconds"] = seconds
        for site, metrics in per_site.items():
            entry["sites"].setdefault(site, {})["evaluate"] = {k: finite_or_none(v) for k, v in metrics.items()}
        self.save()

    def as_list(self) -> list[dict]:
        """Rounds in order."""
        return [self.rounds[number] for number in sorted(self.rounds)]

    def last_evaluation(self) -> tuple[dict, dict[str, dict]]:
        """Aggregate and per-site evaluation metrics of the last evaluated round."""
        for entry in reversed(self.as_list()):
            if entry["evaluate"]:
                return self.evaluation_at(entry["round"])
        return {}, {}

    def evaluation_at(self, server_round: int) -> tuple[dict, dict[str, dict]]:
        """Aggregate and per-site evaluation metrics of one round."""
        entry = self.rounds[server_round]
        per_site = {site: data["evaluate"] for site, data in entry["sites"].items() if "evaluate" in data}
        return entry["evaluate"], per_site

    def handed_on_evaluation(self) -> tuple[dict, dict[str, dict]]:
        """Evaluation metrics of the round the run hands on: the selected one, else the last evaluated one."""
        if self.selected_round is not None and self.selected_round in self.rounds:
            return self.evaluation_at(self.selected_round)
        return self.last_evaluation()

    def save(self) -> None:
        """Write history.json, metrics_per_round.csv and metrics_per_site.csv."""
        self.run_folder.mkdir(parents=True, exist_ok=True)
        document = {"rounds": self.as_list()}
        if self.selected_round is not None:
            document["selected_round"] = self.selected_round
        layout = RunFolder(self.run_folder)
        write_json_atomically(layout.history, document)
        self._write_csv(
            layout.metrics_per_round,
            [
                {
                    "round": entry["round"],
                    **_scalars(entry["train"], "train_"),
                    **_scalars(entry["evaluate"], "eval_"),
                    **_participants(entry),
                }
                for entry in self.as_list()
            ],
        )
        self._write_csv(
            layout.metrics_per_site,
            [
                {
                    "round": entry["round"],
                    "site": site,
                    **_scalars(data.get("train", {}), "train_"),
                    **_scalars(data.get("evaluate", {}), "eval_"),
                }
                for entry in self.as_list()
                for site, data in sorted(entry["sites"].items())
            ],
        )

    @staticmethod
    def _write_csv(path: Path, rows: list[dict]) -> None:
        columns: list[str] = []
        for row in rows:
            columns.extend(key for key in row if key not in columns)
        with replaced_atomically(path) as temporary, temporary.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)


def _participants(entry: dict) -> dict:
    """Which sites trained and evaluated in a round, and which were asked but did not reply (';'-separated)."""
    keys = ("train_sites", "train_missing_sites", "evaluate_sites", "evaluate_missing_sites")
    return {key: ";".join(entry[key]) for key in keys if key in entry}


def _scalars(metrics: dict, prefix: str) -> dict:
    return {prefix + key: value for key, value in metrics.items() if not isinstance(value, list)}
