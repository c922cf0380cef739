"""Flower ServerApp: runs the federated classifier rounds and writes the run folder."""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from server.calibration import calibrate_handed_on_model
from server.checkpoint import CheckpointWriter
from server.gan_phase import feature_classifier_for, run_gan_phase
from server.head_refit import refit_handed_on_layers
from server.history import MetricHistory
from server.model_selection import best_validation_round
from server.plots import plot_history
from server.prior_correction import correct_class_prior
from server.privacy_budget import budget_stop_metadata
from server.prompt_grid import PromptGrid
from server.resume import find_resume_point, gan_phase_needed, note_resume, restore_history
from server.run_config_file import RESUME_KEY
from server.run_stop import start_until_stopped
from server.screened_grid import ScreenedGrid
from server.site_reports import request_site_reports
from server.strategy import build_strategy
from shared.config import RunConfig, run_config_from_flower
from shared.console import configure_console
from shared.durable_files import write_json_atomically
from shared.local_training import seed_everything
from shared.models.classifier import build_classifier
from shared.models.model_cut import cut_model
from shared.privacy.model_preparation import prepare_for_private_training
from shared.run_folder import RunFolder
from shared.weights import model_to_arrays

RUNS_DIR_ENV = "SKIN_FL_RUNS_DIR"
logger = logging.getLogger(__name__)


def new_run_folder(root: Path, name: str = "run") -> Path:
    """A fresh, time-stamped folder under `root` for one run."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    folder = Path(root) / f"{stamp}-{name}"
    suffix = 1
    while folder.exists():
        suffix += 1
        folder = Path(root) / f"{stamp}-{name}-{suffix}"
    folder.mkdir(parents=True)
    return folder


def run_federation(
    grid: Grid, run: RunConfig, run_folder: Path, num_sites: int | None = None, resume_folder: Path | None = None
) -> MetricHistory:
    """Train the classifier federatedly over the sites behind `grid`; returns the history.

    With `resume_folder` the run continues that folder after its last completed round, with the
    folder's own settings, weights and history (`run` and `run_folder` are then not used).
    """
    grid = ScreenedGrid(grid)
    resume = find_resume_point(resume_folder) if resume_folder is not None else None
    if resume is not None:
        note_resume(resume, submitted=run)
        run, run_folder = resume.run, resume.run_folder
    run_folder = Path(run_folder)
    run_folder.mkdir(parents=True, exist_ok=True)
    write_json_atomically(RunFolder(run_folder).config, run.model_dump(mode="json"))
    seed_everything(run.seed)
    model = build_classifier(run.model, num_classes=len(run.classes))
    if run.privacy.mode != "off":
        prepare_for_private_training(model, run.privacy.prepared_stages)
    if run.head_refit_steps():
        cut_model(model, run.federation.refit_layers)  # a model the refit cannot take is refused before training, not after it
    history = MetricHistory(run_folder) if resume is None else restore_history(resume)
    if run.gan.active and gan_phase_needed(resume):
        run_gan_phase(grid, run, run_folder, feature_classifier_for(run, model), num_sites=num_sites)
        if run.gan.only:
            return history
    checkpoints = CheckpointWriter(run_folder, model, run)
    completed_rounds = resume.completed_rounds if resume is not None else 0
    strategy = build_strategy(run, history, checkpoints, num_sites=num_sites, round_offset=completed_rounds)
    start_arrays = resume.arrays if resume is not None and resume.arrays is not None else model_to_arrays(model)
    initial = ArrayRecord({name: Array(array) for name, array in start_arrays.items()})
    started = time.monotonic()
    result = start_until_stopped(
        strategy,
        grid=grid,
        initial_arrays=initial,
        num_rounds=run.federation.rounds - completed_rounds,
        timeout=run.federation.round_timeout_s,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
    )
    # Flower's Result holds an empty ArrayRecord when no round produced new weights.
    final_arrays = result.arrays if result.arrays is not None and len(result.arrays) > 0 else initial
    selection = {"selection": run.federation.select_model}
    if getattr(strategy, "early_stop", None) is not None:
        selection["early_stop"] = strategy.early_stop
        logger.info("skin-fl stopped early: %s", strategy.early_stop)
    if run.federation.select_model == "best-validation":
        selected = best_validation_round(history)
        if selected is not None:
            final_arrays = checkpoints.load_round(selected)
            history.selected_round = selected
            history.save()
            selection["selected_round"] = selected
            logger.info("skin-fl hands on round %d's model (best validation balanced accuracy over the sites)", selected)
    if run.head_refit_steps():
        final_arrays, refit = refit_handed_on_layers(grid, run, final_arrays, model)
        selection["head_refit"] = refit
    if run.federation.calibrate:
        final_arrays, temperature = calibrate_handed_on_model(grid, run, final_arrays, model)
        selection["temperature"] = temperature
    if run.federation.prior_correction:
        final_arrays, offsets = correct_class_prior(grid, run, final_arrays, model)
        selection["prior_offsets"] = offsets
    checkpoints.save_final(
        final_arrays,
        {
            "rounds": run.federation.rounds,
            "wall_seconds": time.monotonic() - started,
            **selection,
            **budget_stop_metadata(strategy),
        },
    )
    plot_history(history.as_list(), RunFolder(run_folder).metrics_plot)
    if run.report.site_reports:
        request_site_reports(grid, run, final_arrays, run_folder)
    return history


def create_server_app(
    run: RunConfig | None = None,
    run_folder: Path | None = None,
    num_sites: int | None = None,
    resume_folder: Path | None = None,
) -> ServerApp:
    """A ServerApp bound to given settings (simulation) or reading Flower's run config (deployment).

    In deployment the run-config key `resume-folder` (empty: a new run) names a run folder to continue.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        flat = dict(context.run_config)
        resume = resume_folder or (Path(str(flat.pop(RESUME_KEY))) if flat.get(RESUME_KEY) else None)
        flat.pop(RESUME_KEY, None)
        if run is None:  # a deployment (or flwr run): this process is the ServerApp's own
            configure_console()
        settings = run if run is not None else run_config_from_flower(flat)
        folder = resume or run_folder or new_run_folder(Path(os.environ.get(RUNS_DIR_ENV, "runs")), name=f"run-{context.run_id}")
        if run_folder is None:
            logger.info("skin-fl run folder: %s", folder)
        run_federation(PromptGrid(grid), settings, folder, num_sites=num_sites, resume_folder=resume)

    return app


app = create_server_app()
