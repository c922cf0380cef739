"""Per-round overhead of a real deployment (nginx + SuperLink over TLS + SuperNodes on loopback).

Overhead of a round = its wall time at the server (train phase + evaluate phase) minus the longest
local training time a site reported for that round. What is left is process start-up of the
per-message ClientApp, loading the site's cache, building the model, (de)serialising weights,
TLS, nginx, and the SuperNodes' polling. Each site count runs twice, alternately: with the site's own
task runner (`client.task_runner`, as skin-fl-client starts a site: code loaded once, a forked
worker per message) and with Flower's default of a fresh `flwr-clientapp` process per message; the
ratio of their overheads is measured in one run. Run from a source checkout (it reuses the loopback
deployment of tests/deploy_harness.py):

    python -m simulation.deploy_overhead --sites 2 4 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from shared.run_folder import RunFolder

REPO = Path(__file__).resolve().parent.parent
RUNNERS = {"skin-fl": True, "flower": False}
"""Runner name -> whether the SuperNodes run under skin-fl's task runner (else Flower's per-message processes)."""


def measure(num_sites: int, runner: str, model: str, rounds: int, images_per_site: int, max_steps: int, workdir: Path) -> dict:
    """Run one federation of `num_sites` demo sites for `rounds` rounds with `runner`; returns per-round overhead figures."""
    from deploy_harness import FAST_RUN_CONFIG, Deployment

    names = tuple(f"site {index + 1}" for index in range(num_sites))
    run_config = {
        **FAST_RUN_CONFIG, "model": model, "num-server-rounds": rounds, "max-steps-per-epoch": max_steps, "min-sites": num_sites,
    }
    with Deployment(workdir / f"{num_sites}-sites-{runner}", site_names=names, images_per_site=images_per_site,
                    task_runner=RUNNERS[runner]) as deployment:
        deployment.make_credentials()
        deployment.make_site_data()
        deployment.start_server()
        for site in deployment.sites:
            deployment.start_supernode(site, ca=deployment.credentials / "ca.crt")
        started = time.monotonic()
        run_id = deployment.submit(run_config)
        status = deployment.wait_for_run(run_id, timeout=600 + 120 * rounds * num_sites)
        total_seconds = time.monotonic() - started
        if status != "finished:completed":
            raise RuntimeError(f"the {num_sites}-site run ended {status}:\n{deployment.log_tails()}")
        history = RunFolder(deployment.run_folder(run_id)).history_rounds()
    per_round = []
    for entry in history:
        train_seconds = [site["train"]["train-seconds"] for site in entry["sites"].values() if "train" in site]
        wall = entry["train_wall_seconds"] + entry["evaluate_wall_seconds"]
        per_round.append(
            {
                "round": entry["round"],
                "sites_trained": len(train_seconds),
                "round_wall_s": round(wall, 2),
                "train_phase_wall_s": round(entry["train_wall_seconds"], 2),
                "evaluate_phase_wall_s": round(entry["evaluate_wall_seconds"], 2),
                "longest_local_training_s": round(max(train_seconds), 2),
                "overhead_s": round(wall - max(train_seconds), 2),
                "train_phase_overhead_s": round(entry["train_wall_seconds"] - max(train_seconds), 2),
            }
        )
    later = [entry["overhead_s"] for entry in per_round[1:]] or [per_round[0]["overhead_s"]]
    return {
        "sites": num_sites,
        "runner": runner,
        "model": model,
        "rounds": per_round,
        "first_round_overhead_s": per_round[0]["overhead_s"],
        "later_rounds_mean_overhead_s": round(statistics.mean(later), 2),
        "submit_to_finish_s": round(total_seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Measure the overhead for each site count and print a table (and JSON with --output)."""
    from shared.config import DEFAULT_MODEL  # importing shared first installs the torchvision shim the harness needs

    parser = argparse.ArgumentParser(prog="python -m simulation.deploy_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[2, 4], help="site counts to measure (default 2 4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (default 3)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"timm model the run sends (randomly initialised; default {DEFAULT_MODEL}, the deployments' default)")
    parser.add_argument("--images-per-site", type=int, default=36, help="demo images per site (default 36)")
    parser.add_argument("--max-steps", type=int, default=2, help="optimiser steps per local epoch (default 2)")
    parser.add_argument("--runners", nargs="+", choices=sorted(RUNNERS), default=["skin-fl", "flower"],
                        help="site runners to compare, run alternately for each site count (default: skin-fl flower)")
    parser.add_argument("--output", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "tests"))

    results = []
    with tempfile.TemporaryDirectory(prefix="skin-fl-overhead-") as scratch:
        for num_sites in args.sites:
            for runner in args.runners:
                results.append(
                    measure(num_sites, runner, args.model, args.rounds, args.images_per_site, args.max_steps, Path(scratch))
                )
    print(f"{'sites':>5} {'runner':>7} {'round':>5} {'wall s':>7} {'train s':>8} {'eval s':>7} {'local train s':>13} {'overhead s':>10}")
    for result in results:
        for entry in result["rounds"]:
            print(
                f"{result['sites']:>5} {result['runner']:>7} {entry['round']:>5} {entry['round_wall_s']:>7.2f} "
                f"{entry['train_phase_wall_s']:>8.2f} {entry['evaluate_phase_wall_s']:>7.2f} "
                f"{entry['longest_local_training_s']:>13.2f} {entry['overhead_s']:>10.2f}"
            )
        print(
            f"{result['sites']:>5} sites, {result['runner']} runner: overhead round 1 {result['first_round_overhead_s']:.2f} s, "
            f"later rounds mean {result['later_rounds_mean_overhead_s']:.2f} s; submit to finish {result['submit_to_finish_s']:.1f} s"
        )
    by_key = {(result["sites"], result["runner"]): result for result in results}
    for num_sites in args.sites:
        if (num_sites, "skin-fl") in by_key and (num_sites, "flower") in by_key:
            ours, flowers = by_key[num_sites, "skin-fl"], by_key[num_sites, "flower"]
            print(
                f"{num_sites:>5} sites: later-round overhead skin-fl / flower runner = "
                f"{ours['later_rounds_mean_overhead_s'] / flowers['later_rounds_mean_overhead_s']:.2f}x"
            )
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
