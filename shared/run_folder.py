"""The layout of a run folder: one name for every file a run writes there, and one reader of its histories."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigError

_ROUND_FILE = re.compile(r"^round_(\d{3,})\.pt$")


def _round_file(server_round: int, suffix: str = ".pt") -> str:
    return f"round_{server_round:03d}{suffix}"


def _checkpoints_in(folder: Path) -> dict[int, Path]:
    if not folder.is_dir():
        return {}
    found = {int(match.group(1)): path for path in folder.iterdir() if (match := _ROUND_FILE.match(path.name))}
    return dict(sorted(found.items()))


def _read_history(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(document, dict) or not isinstance(document.get("rounds", []), list):
            raise ValueError("it holds no list of rounds")
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path} is damaged ({error}); restore it from a backup or start a new run.") from error
    return document


@dataclass(frozen=True)
class RunFolder:
    """A run's folder: the settings, per-round history and tables, checkpoints, final model, GAN phase and simulated sites."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        """The validated settings the run started with."""
        return self.path / "config.json"

    @property
    def history(self) -> Path:
        """Every round's aggregated metrics, sites and timings (and the handed-on round)."""
        return self.path / "history.json"

    @property
    def metrics_per_round(self) -> Path:
        return self.path / "metrics_per_round.csv"

    @property
    def metrics_per_site(self) -> Path:
        return self.path / "metrics_per_site.csv"

    @property
    def metrics_plot(self) -> Path:
        return self.path / "metrics.png"

    @property
    def resumes(self) -> Path:
        """When the run was resumed, after which round, with what changed."""
        return self.path / "resumes.json"

    @property
    def privacy(self) -> Path:
        """The sites' reported epsilons per round (private runs)."""
        return self.path / "privacy.json"

    @property
    def summary(self) -> Path:
        """A simulation's summary (federated and pooled figures, wall times)."""
        return self.path / "summary.json"

    @property
    def final_model(self) -> Path:
        """The model the run hands on (refitted, calibrated and prior-corrected)."""
        return self.path / "final_model.pt"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, server_round: int) -> Path:
        """The global model after `server_round`."""
        return self.checkpoints / _round_file(server_round)

    def checkpoint_files(self) -> dict[int, Path]:
        """The round checkpoints present, by round, in round order."""
        return _checkpoints_in(self.checkpoints)

    @property
    def centralised(self) -> RunFolder:
        """A simulation's pooled baseline, laid out like a run folder."""
        return RunFolder(self.path / "centralised")

    @property
    def sites(self) -> Path:
        """A simulation's virtual sites: split tables, manifest, privacy ledgers, reports."""
        return self.path / "sites"

    @property
    def manifest(self) -> Path:
        return self.sites / "manifest.json"

    @property
    def gan(self) -> Path:
        return self.path / "gan"

    @property
    def gan_history(self) -> Path:
        return self.gan / "history.json"

    @property
    def gan_selection(self) -> Path:
        """The sites' synthetic-image selection totals."""
        return self.gan / "selection.json"

    @property
    def synthetic_counts(self) -> Path:
        return self.path / "synthetic_counts.csv"

    def gan_checkpoint(self, server_round: int) -> Path:
        """The global GAN after `server_round`."""
        return self.gan / "checkpoints" / _round_file(server_round)

    def gan_checkpoint_files(self) -> dict[int, Path]:
        return _checkpoints_in(self.gan / "checkpoints")

    def gan_grid(self, server_round: int) -> Path:
        """The per-class sample grid after `server_round`."""
        return self.gan / "grids" / _round_file(server_round, ".png")

    def read_history(self) -> dict:
        """history.json as written (empty when there is none yet); a damaged file is an error that says what to do."""
        return _read_history(self.history)

    def history_rounds(self) -> list[dict]:
        """The rounds recorded in history.json, in round order (none when there is no history yet)."""
        return sorted(self.read_history().get("rounds", []), key=lambda entry: entry["round"])

    def gan_history_rounds(self) -> list[dict]:
        """The GAN rounds recorded in gan/history.json, in round order."""
        return sorted(_read_history(self.gan_history).get("rounds", []), key=lambda entry: entry["round"])
