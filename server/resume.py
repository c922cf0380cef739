"""Resuming a run folder: its settings, the last completed round's global weights and the metric history."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from server.history import MetricHistory
from shared.config import RunConfig
from shared.durable_files import write_json_atomically
from shared.errors import ConfigError, ModelError, SkinFLError
from shared.models.classifier import load_classifier
from shared.run_folder import RunFolder
from shared.weights import model_to_arrays

logger = logging.getLogger(__name__)


@dataclass
class ResumePoint:
    """Where a run folder stands: its settings, rounds completed, their history and the global weights."""

    run_folder: Path
    run: RunConfig
    completed_rounds: int
    history_rounds: list[dict]
    arrays: dict[str, np.ndarray] | None
    """Global weights after the last completed round; None when no round completed (start afresh)."""
    unloadable_checkpoints: list[int] = field(default_factory=list)
    """Newer rounds whose checkpoint did not load (cut short by a crash); they run again."""

    @property
    def remaining_rounds(self) -> int:
        """Rounds still to run to reach the configured total."""
        return self.run.federation.rounds - self.completed_rounds


def completed_round(entry: dict) -> bool:
    """Whether a history entry is a finished round: trained, checkpointed and evaluated."""
    return "train_sites" in entry and "evaluate_sites" in entry


def read_run_settings(run_folder: Path) -> RunConfig:
    """The validated settings a run folder was started with (its config.json)."""
    path = RunFolder(run_folder).config
    if not path.is_file():
        raise ConfigError(
            f"{run_folder} is not a skin-fl run folder (no config.json); give the folder the interrupted run "
            "wrote (printed as 'Run folder:' / 'skin-fl run folder:' when it started)."
        )
    try:
        return RunConfig.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, ValueError) as error:
        raise ConfigError(
            f"{path} is damaged or was edited ({error}); restore it from a backup or start a new run."
        ) from error


def find_resume_point(run_folder: Path) -> ResumePoint:
    """The last round of `run_folder` that finished completely, with its weights and the history up to it.

    A round counts as finished when it was trained, checkpointed and evaluated; the round in flight
    when the server stopped (any later history entry or checkpoint) is run again.
    """
    run_folder = Path(run_folder).expanduser().resolve()
    run = read_run_settings(run_folder)
    layout = RunFolder(run_folder)
    rounds = layout.history_rounds()
    checkpoints = set(layout.checkpoint_files())
    completed = 0
    for entry in rounds:
        number = entry["round"]
        if number != completed + 1 or not completed_round(entry) or number not in checkpoints:
            break
        completed = number
    if layout.final_model.is_file():
        raise ConfigError(
            f"{run_folder} already has its final_model.pt: the run finished (after {completed} of "
            f"{run.federation.rounds} rounds), so there is nothing to resume. Start a new run to train further."
        )
    if completed >= run.federation.rounds:
        raise ConfigError(
            f"{run_folder} already finished all {run.federation.rounds} rounds; there is nothing to resume. "
            "Start a new run to train further."
        )
    arrays, unloadable = None, []
    while completed:
        checkpoint = layout.checkpoint(completed)
        try:
            model, saved = load_classifier(checkpoint)
        except ModelError as error:
            # A power loss can leave the newest checkpoint empty or cut short: go back to one that loads.
            unloadable.append(completed)
            logger.warning("resume: the checkpoint of round %d does not load (%s); trying round %d", completed, error, completed - 1)
            completed -= 1
            continue
        if saved.classes != run.classes or saved.model_name != run.model.name:
            raise ConfigError(
                f"{checkpoint} holds a {saved.model_name} for classes {saved.classes}, but {run_folder}/config.json "
                f"describes a {run.model.name} for {run.classes}; the folder mixes two runs, start a new run."
            )
        arrays = model_to_arrays(model)
        break
    if unloadable:
        logger.warning(
            "resume: checkpoints of round(s) %s do not load; the run continues after round %d, the newest checkpoint "
            "that loads (rounds after it run again)", ", ".join(map(str, unloadable)), completed,
        )
    kept = [entry for entry in rounds if entry["round"] <= completed]
    return ResumePoint(run_folder, run, completed, kept, arrays, unloadable)


def restore_history(point: ResumePoint) -> MetricHistory:
    """A MetricHistory holding the completed rounds, saved so the files drop the round in flight."""
    history = MetricHistory(point.run_folder)
    history.rounds = {entry["round"]: entry for entry in point.history_rounds}
    history.save()
    return history


def note_resume(point: ResumePoint, submitted: RunConfig | None = None) -> None:
    """Append this resume to the run folder's resumes.json and log what continues."""
    differences = _setting_differences(point.run, submitted) if submitted is not None else []
    if differences:
        logger.warning(
            "resuming %s with its own saved settings; the submitted settings differ in %s and are not used",
            point.run_folder,
            ", ".join(differences),
        )
    path = RunFolder(point.run_folder).resumes
    try:
        earlier = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    except json.JSONDecodeError as error:
        raise SkinFLError(f"{path} is damaged ({error}); remove it (it only lists earlier resumes) and resume again") from error
    earlier.append(
        {
            "resumed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "after_round": point.completed_rounds,
            "remaining_rounds": point.remaining_rounds,
            "ignored_submitted_settings": differences,
        }
    )
    write_json_atomically(path, earlier)
    logger.info(
        "resuming %s after round %d of %d", point.run_folder, point.completed_rounds, point.run.federation.rounds
    )


def _setting_differences(saved: RunConfig, submitted: RunConfig) -> list[str]:
    def flatten(prefix: str, value) -> dict:
        if isinstance(value, dict):
            return {key: item for name, inner in value.items() for key, item in flatten(f"{prefix}{name}.", inner).items()}
        return {prefix.rstrip("."): value}

    left, right = flatten("", saved.model_dump(mode="json")), flatten("", submitted.model_dump(mode="json"))
    return sorted(key for key in left.keys() | right.keys() if left.get(key) != right.get(key))


def gan_phase_needed(point: ResumePoint | None) -> bool:
    """Whether the GAN phase runs: always in a new run, in a resumed one only before any classifier round.

    A resumed run whose classifier rounds had started has its GAN phase behind it; with synthetic
    augmentation the sites' synthesis would have to be redone, which a resume does not do.
    """
    if point is None or point.completed_rounds == 0:
        return True
    if point.run.gan.augment:
        raise ConfigError(
            f"{point.run_folder} trained its classifier on GAN-augmented data; resuming its classifier rounds "
            "is not supported. Start a new run with gan-generator set to the run's last GAN checkpoint "
            "(gan/checkpoints/round_NNN.pt) and gan-rounds 0 to reuse the trained generator."
        )
    return False
