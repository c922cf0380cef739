"""Benchmark: does averaging a run's last k global checkpoints beat its final model on the sites' test splits?"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the ensemble benchmark."""
    parser = argparse.ArgumentParser(
        prog="python -m simulation.ensemble_benchmark",
        description="Score a skin-fl-sim run's final model and ensembles of its last k round checkpoints on every "
        "site's test split (the run's own split tables and image caches).",
    )
    parser.add_argument("run_folder", type=Path, help="a run folder written by skin-fl-sim")
    parser.add_argument("--last", type=int, nargs="+", default=[2, 3], help="ensemble sizes k to compare (default 2 3)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--output", type=Path, help="JSON file (default: <run folder>/ensemble_benchmark.json)")
    return parser


def site_test_images(run_folder: Path, classes: list[str], preprocess) -> dict:
    """Every simulated site's cached test split, from the run's manifest."""
    from shared.run_folder import RunFolder
    from shared.site_data import load_table_csv, prepare_site_images

    manifest = json.loads(RunFolder(run_folder).manifest.read_text())
    sites = {}
    for entry in manifest["sites"]:
        table = load_table_csv(Path(entry["table_csv"]), classes)
        images = prepare_site_images(
            table, site=entry["name"], classes=classes, split_fractions=(0.7, 0.15, 0.15), seed=0,
            cache_root=Path(manifest["cache_root"]), preprocess=preprocess, progress=False,
        )
        sites[entry["name"]] = images.select("test")
    return sites


def score(paths: list[Path], sites: dict) -> dict:
    """Per-site and pooled metrics of the ensemble of `paths` (mean probabilities)."""
    import numpy as np

    from client.report import predict_images
    from shared.data.cache import concatenate
    from shared.ensemble import Ensemble
    from shared.isic_metrics import isic_scores
    from shared.metrics import classification_metrics

    ensemble = Ensemble.load(paths)
    per_site = {}
    for name, images in sites.items():
        metrics = classification_metrics(images.labels, predict_images(ensemble, images), ensemble.classes)
        per_site[name] = {"balanced_accuracy": metrics["balanced_accuracy"], "macro_auc": metrics["macro_auc"], "n": metrics["num_examples"]}
    pooled = concatenate(list(sites.values()))
    probabilities = predict_images(ensemble, pooled)
    metrics = classification_metrics(pooled.labels, probabilities, ensemble.classes)
    isic = isic_scores(pooled.labels, probabilities, ensemble.classes)
    return {
        "models": [path.name for path in paths],
        "pooled_balanced_accuracy": metrics["balanced_accuracy"],
        "pooled_macro_auc": metrics["macro_auc"],
        "pooled_macro_auc_sens_80": isic["macro_average"]["auc_sens_80"],
        "mean_site_balanced_accuracy": float(np.mean([row["balanced_accuracy"] for row in per_site.values()])),
        "sites": per_site,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point: final model vs last-k ensembles, printed and saved."""
    import torch

    from shared.models.classifier import load_classifier
    from shared.run_folder import RunFolder

    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    layout = RunFolder(args.run_folder)
    _, saved = load_classifier(layout.final_model)
    sites = site_test_images(args.run_folder, saved.classes, saved.preprocess)
    checkpoints = list(layout.checkpoint_files().values())
    results = {"final": score([layout.final_model], sites)}
    for k in args.last:
        if k <= len(checkpoints):
            results[f"last_{k}"] = score(checkpoints[-k:], sites)
    print(f"{'models':<10} {'pooled bal. acc':>16} {'mean site bal. acc':>19} {'pooled macro AUC':>17} {'AUC>80% sens':>13}")
    for name, row in results.items():
        print(f"{name:<10} {row['pooled_balanced_accuracy']:>16.3f} {row['mean_site_balanced_accuracy']:>19.3f} "
              f"{row['pooled_macro_auc']:>17.3f} {row['pooled_macro_auc_sens_80']:>13.3f}")
    load_after = os.getloadavg()
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} on {os.cpu_count()} cores")
    output = args.output or args.run_folder / "ensemble_benchmark.json"
    output.write_text(json.dumps({"run_folder": str(args.run_folder), "results": results}, indent=2) + "\n")
    print(f"written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
