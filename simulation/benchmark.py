"""Benchmark: pooled training vs FedAvg over HAM10000's four natural sites, same epochs, same test split."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from shared.run_folder import RunFolder
from simulation.cli import build_parser, run_simulation_command

DEFAULT_DATA = Path(os.environ.get("SKIN_FL_HAM10000_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000"))


def evaluate_on_pooled_test(model_path: Path, site_images: dict) -> dict:
    """Metrics of a saved model on the union of all sites' test splits (exact pooled AUC)."""
    from shared.config import TrainConfig
    from shared.data.cache import concatenate
    from shared.device import resolve_device
    from shared.local_training import evaluate_on_images, precision_for
    from shared.models.classifier import load_classifier

    device = resolve_device("auto")
    model, saved = load_classifier(model_path, device=str(device))
    pooled_test = concatenate([images.select("test") for images in site_images.values()])
    precision = precision_for(model, TrainConfig(), device, saved.preprocess.image_size)
    return evaluate_on_images(model, pooled_test, batch_size=64, device=device, precision=precision)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print wall times, their ratio and the quality figures of both."""
    parser = argparse.ArgumentParser(prog="python -m simulation.benchmark", description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"HAM10000 folder (default {DEFAULT_DATA})")
    parser.add_argument("--rounds", type=int, default=8, help="federated rounds = pooled epochs (x local epochs)")
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sim_args = build_parser().parse_args(
        [
            "--data", str(args.data), "--format", "ham10000", "--partition", "natural",
            "--rounds", str(args.rounds), "--local-epochs", str(args.local_epochs),
            "--image-size", str(args.image_size), "--model", args.model, "--seed", str(args.seed),
            "--runs-dir", str(args.runs_dir), "--name", "benchmark", "--centralised",
        ]
    )
    outcome = run_simulation_command(sim_args)
    folder = outcome.run_folder
    federated = evaluate_on_pooled_test(RunFolder(folder).final_model, outcome.sites.images)
    pooled = evaluate_on_pooled_test(RunFolder(folder).centralised.final_model, outcome.sites.images)
    walls = {"federated": outcome.summary["federated"]["wall_seconds"], "pooled": outcome.summary["centralised"]["wall_seconds"]}
    print("\nBenchmark: pooled vs FedAvg, 4 natural HAM10000 sites, lesion-disjoint pooled test split "
          f"({federated['num_examples']} images), {args.rounds * args.local_epochs} epochs, {args.image_size} px")
    print(f"{'':10s} {'wall s':>8s} {'bal. acc':>9s} {'accuracy':>9s} {'macro AUC':>10s} {'mel sens':>9s}")
    for name, metrics in (("pooled", pooled), ("federated", federated)):
        print(f"{name:10s} {walls[name]:8.1f} {metrics['balanced_accuracy']:9.3f} {metrics['accuracy']:9.3f} "
              f"{metrics['macro_auc']:10.3f} {metrics['melanoma_sensitivity']:9.3f}")
    ratios = {
        "wall_time_federated_over_pooled": walls["federated"] / walls["pooled"],
        "balanced_accuracy_federated_over_pooled": federated["balanced_accuracy"] / pooled["balanced_accuracy"],
    }
    print(f"FL / pooled wall time: {ratios['wall_time_federated_over_pooled']:.2f}x (target <= 1.10)")
    print(f"FL / pooled balanced accuracy: {ratios['balanced_accuracy_federated_over_pooled']:.3f} (target >= 0.95)")
    (folder / "benchmark.json").write_text(
        json.dumps({"wall_seconds": walls, "pooled": pooled, "federated": federated, "ratios": ratios}, indent=2) + "\n"
    )
    print(f"written to {folder / 'benchmark.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
