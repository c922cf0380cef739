"""Flower ServerApp: runs the federated classifier rounds and writes the run folder."""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from server.checkpoint import CheckpointWriter
from server.history import MetricHistory, write_json_atomically
from server.plots import plot_history
from server.strategy import build_strategy
from shared.config import RunConfig, run_config_from_flower
from shared.local_training import seed_everything
from shared.models.classifier import build_classifier
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


def run_federation(grid: Grid, run: RunConfig, run_folder: Path, num_sites: int | None = None) -> MetricHistory:
    """Train the classifier federatedly over the sites behind `grid`; returns the history."""
    run_folder = Path(run_folder)
    run_folder.mkdir(parents=True, exist_ok=True)
    write_json_atomically(run_folder / "config.json", run.model_dump(mode="json"))
    seed_everything(run.seed)
    model = build_classifier(run.model, num_classes=len(run.classes))
    history = MetricHistory(run_folder)
    checkpoints = CheckpointWriter(run_folder, model, run)
    strategy = build_strategy(run, history, checkpoints, num_sites=num_sites)
    initial = ArrayRecord({name: Array(array) for name, array in model_to_arrays(model).items()})
    started = time.monotonic()
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=run.federation.rounds,
        timeout=run.federation.round_timeout_s,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
    )
    final_arrays = result.arrays if result.arrays is not None else initial
    checkpoints.save_final(
        final_arrays, {"rounds": run.federation.rounds, "wall_seconds": time.monotonic() - started}
    )
    plot_history(history.as_list(), run_folder / "metrics.png")
    return history


def create_server_app(run: RunConfig | None = None, run_folder: Path | None = None, num_sites: int | None = None) -> ServerApp:
    """A ServerApp bound to given settings (simulation) or reading Flower's run config (deployment)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = run if run is not None else run_config_from_flower(dict(context.run_config))
        folder = run_folder or new_run_folder(Path(os.environ.get(RUNS_DIR_ENV, "runs")))
        logger.info("skin-fl run folder: %s", folder)
        run_federation(grid, settings, folder, num_sites=num_sites)

    return app


app = create_server_app()
