"""`skin-fl-sim --resume RUN_FOLDER`: continue an interrupted simulation from its last completed round."""

from __future__ import annotations

import argparse
import json
import time

from server.resume import find_resume_point
from shared.errors import ConfigError, SkinFLError
from shared.run_folder import RunFolder


def check_resume_arguments(args: argparse.Namespace) -> None:
    """Refuse options that would change a resumed run: it keeps the folder's own data and settings."""
    clashing = [option for option, value in (("--data", args.data), ("--centralised", args.centralised)) if value]
    if clashing:
        raise ConfigError(
            f"--resume continues a run with its own sites and settings; drop {', '.join(clashing)} "
            "(start a new run to change them)."
        )


def resume_simulation_command(args: argparse.Namespace):
    """Run the rounds an interrupted simulation had left, into the same run folder; returns its outcome."""
    from flwr.simulation import run_simulation

    from client.app import create_client_app
    from client.site_source import SimulationSites
    from server.app import create_server_app
    from server.history import MetricHistory
    from shared.device import resolve_device
    from simulation.cli import SimulationOutcome, simulation_resources
    from simulation.report import format_result_table, handed_on_model, site_metrics_from_flower

    check_resume_arguments(args)
    point = find_resume_point(args.resume)
    manifest_path = RunFolder(point.run_folder).manifest
    if not manifest_path.is_file():
        raise ConfigError(
            f"{point.run_folder} has no {manifest_path.relative_to(point.run_folder)}, so it is not a skin-fl-sim run folder; a deployed run "
            "resumes with 'skin-fl-server submit RUN_CONFIG.toml --resume RUN_FOLDER'."
        )
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    num_sites = len(manifest["sites"])
    run = point.run
    print(f"Run folder: {point.run_folder}")
    print(
        f"Resuming after round {point.completed_rounds} of {run.federation.rounds}: "
        f"{point.remaining_rounds} round(s) left, {num_sites} sites"
    )
    device = resolve_device(run.train.device)
    _, backend_config = simulation_resources(num_sites, device.type, args.threads_per_site or manifest["threads_per_site"])
    started = time.monotonic()
    run_simulation(
        server_app=create_server_app(run, point.run_folder, num_sites=num_sites, resume_folder=point.run_folder),
        client_app=create_client_app(SimulationSites(manifest_path)),
        num_supernodes=num_sites,
        backend_config=backend_config,
    )
    seconds = time.monotonic() - started
    history = MetricHistory.load(point.run_folder)
    if max(history.rounds, default=0) < run.federation.rounds:
        raise SkinFLError(
            f"the resumed run stopped after round {max(history.rounds, default=0)} of {run.federation.rounds}; "
            f"see the site errors in the log above, then resume again with --resume {point.run_folder}"
        )
    aggregate, per_site = history.handed_on_evaluation()
    print()
    print(
        format_result_table(
            f"Federated ({run.federation.strategy}, resumed after round {point.completed_rounds}, "
            f"{run.federation.rounds} rounds in all) - {handed_on_model(history)} on each site's test split",
            {site: site_metrics_from_flower(metrics) for site, metrics in per_site.items()},
            site_metrics_from_flower(aggregate),
        )
    )
    print(f"resumed part wall time: {seconds:.1f} s")
    print(f"\nRun folder: {point.run_folder} (history continued; resumes listed in resumes.json)")
    return SimulationOutcome(point.run_folder, run, None, {"resumed": {"wall_seconds": seconds, "final": aggregate}})
