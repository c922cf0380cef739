"""The privacy-utility curve of the linear-head DP recipe on HAM10000's natural sites: balanced accuracy and AUC vs epsilon.

Each cell (an epsilon, or none, and a seed) runs the federated recipe in one process: every round,
every site trains the global head with `train_privately` (the function a site's ClientApp calls,
ledger and budget enforcement included) and the heads are averaged by FedAvg weighted by training
images. The model is scored on the pooled lesion-disjoint test split. Cells are written as JSON as
they finish, so an interrupted curve resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from simulation.benchmark import DEFAULT_DATA
from simulation.sites import natural_site_images

NO_NOISE = 1e-3
"""Noise multiplier of the non-private cell: the same recipe, clipping included, with noise of no effect."""
MAX_GRAD_NORM = 20.0
"""Clipping norm of the curve: most head gradients are clipped a little (lite0's 128 px features have norms 16-44)."""
FINE_TUNE_REFERENCE = {64: 0.608, 128: 0.632}
"""Pooled full fine-tune balanced accuracy on the same test split (README, measured tables), per image size."""


def _run_config(args, classes: list[str], epsilon: float | None, seed: int):
    from shared.config import RunConfig

    privacy = {"mode": "local", "target_delta": args.delta, "max_grad_norm": args.max_grad_norm, "recipe": "linear-head"}
    privacy.update({"target_epsilon": epsilon} if epsilon is not None else {"noise_multiplier": NO_NOISE})
    for name in ("head_steps_per_round", "head_batch_size", "head_learning_rate", "head_momentum"):
        if getattr(args, name) is not None:
            privacy[name] = getattr(args, name)
    return RunConfig(
        classes=classes,
        model={"name": args.model},
        preprocess={"image_size": args.image_size},
        # fp32: on a CPU with bf16 instructions "auto" measures which is faster, so the features could differ per run.
        train={"balance": "none", "progress": False, "amp": "off"},
        federation={"rounds": args.rounds},
        privacy=privacy,
        seed=seed,
    )


def _compute_features(args, site_images: dict, classes: list[str]) -> None:
    """Compute (or load from the output folder) every site's train and the pooled test features once, for all cells."""
    import torch

    from shared.data.cache import concatenate
    from shared.local_training import precision_for
    from shared.models.classifier import build_classifier
    from shared.models.frozen_features import frozen_features
    from shared.privacy.model_preparation import prepare_for_private_training

    run = _run_config(args, classes, 8.0, 0)
    model = prepare_for_private_training(build_classifier(run.model, len(classes)), run.privacy.prepared_stages)
    device = torch.device("cpu")
    precision = precision_for(model, run.train, device, args.image_size, private=True)
    started = time.monotonic()
    splits = [images.select("train") for _, images in sorted(site_images.items())]
    for images in splits + [concatenate([images.select("test") for images in site_images.values()])]:
        frozen_features(model, images, device=device, precision=precision, cache_dir=args.output / "features")
    print(f"frozen features of {sum(len(images) for images in splits)} training images and the pooled test split: "
          f"{time.monotonic() - started:.0f} s", flush=True)


def run_cell(args, site_images: dict, classes: list[str], epsilon: float | None, seed: int) -> dict:
    """One federated run of the recipe at `epsilon` (None: no noise); pooled test metrics and per-site privacy figures."""
    import torch

    from shared.aggregation import weighted_average
    from shared.data.cache import concatenate
    from shared.local_training import precision_for, seed_everything, site_round_seed
    from shared.metrics import classification_metrics
    from shared.models.classifier import build_classifier
    from shared.models.frozen_features import frozen_features
    from shared.privacy.accounting import PrivacyLedger
    from shared.privacy.model_preparation import prepare_for_private_training
    from shared.privacy.training import train_privately

    run = _run_config(args, classes, epsilon, seed)
    seed_everything(seed)
    device = torch.device("cpu")
    model = prepare_for_private_training(build_classifier(run.model, len(classes)), run.privacy.prepared_stages)
    precision = precision_for(model, run.train, device, args.image_size, private=True)
    head = model.get_classifier()
    global_head = {name: value.detach().numpy().copy() for name, value in head.state_dict().items()}
    sites = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as ledgers:
        for server_round in range(1, run.federation.rounds + 1):
            updates, weights = [], []
            for site, images in sorted(site_images.items()):
                train_images = images.select("train")
                head.load_state_dict({name: torch.from_numpy(value.copy()) for name, value in global_head.items()})
                ledger = PrivacyLedger.open(Path(ledgers), site, "curve", run.privacy.target_delta)
                result = train_privately(
                    model, train_images, run=run, ledger=ledger, server_round=server_round, device=device, precision=precision,
                    learning_rate_start=1.0, learning_rate_end=1.0, seed=site_round_seed(seed, server_round, site),
                )
                updates.append({name: value.detach().cpu().numpy().copy() for name, value in head.state_dict().items()})
                weights.append(len(train_images))
                entry = sites.setdefault(site, {"train_images": len(train_images), "signal_to_noise_round_1": result.signal_to_noise})
                entry.update(epsilon=result.epsilon, noise_multiplier=result.noise_multiplier, sample_rate=result.sample_rate,
                             steps_per_round=result.steps)
            global_head = weighted_average(updates, weights)
    head.load_state_dict({name: torch.from_numpy(value.copy()) for name, value in global_head.items()})
    pooled_test = concatenate([images.select("test") for images in site_images.values()])
    features = frozen_features(model, pooled_test, device=device, precision=precision, cache_dir=args.output / "features")
    with torch.no_grad():
        probabilities = torch.softmax(head(features), dim=1).numpy()
    metrics = classification_metrics(np.asarray(pooled_test.labels), probabilities, classes)
    return {
        "epsilon_target": epsilon, "seed": seed, "split_seed": args.split_seed, "image_size": args.image_size, "rounds": run.federation.rounds,
        "privacy": run.privacy.model_dump(mode="json"), "balanced_accuracy": metrics["balanced_accuracy"],
        "macro_auc": metrics["macro_auc"], "accuracy": metrics["accuracy"], "test_images": metrics["num_examples"],
        "sites": sites, "wall_seconds": time.monotonic() - started,
    }


def _label(epsilon: float | None) -> str:
    return "none" if epsilon is None else f"{epsilon:g}"


def summarise(cells: list[dict], reference: float | None) -> tuple[str, list[dict]]:
    """The Markdown table (mean ± sd over seeds per epsilon, ratio to the no-noise recipe) and its rows."""
    by_epsilon: dict = {}
    for cell in cells:
        by_epsilon.setdefault(cell["epsilon_target"], []).append(cell)
    baseline = by_epsilon.get(None)
    baseline_mean = float(np.mean([cell["balanced_accuracy"] for cell in baseline])) if baseline else None
    rows = []
    for epsilon in sorted(by_epsilon, key=lambda value: float("inf") if value is None else value):
        group = by_epsilon[epsilon]
        balanced = np.asarray([cell["balanced_accuracy"] for cell in group])
        auc = np.asarray([cell["macro_auc"] for cell in group])
        rows.append({
            "epsilon": epsilon, "seeds": len(group), "balanced_accuracy_mean": float(balanced.mean()),
            "balanced_accuracy_sd": float(balanced.std(ddof=1)) if len(group) > 1 else 0.0,
            "macro_auc_mean": float(auc.mean()), "macro_auc_sd": float(auc.std(ddof=1)) if len(group) > 1 else 0.0,
            "ratio_to_no_noise": float(balanced.mean()) / baseline_mean if baseline_mean else None,
        })
    lines = ["| epsilon | seeds | balanced accuracy | macro AUC | x no-noise recipe |", "|---|---|---|---|---|"]
    for row in rows:
        ratio = "" if row["ratio_to_no_noise"] is None else f"{row['ratio_to_no_noise']:.2f}"
        lines.append(
            f"| {'no noise' if row['epsilon'] is None else _label(row['epsilon'])} | {row['seeds']} | "
            f"{row['balanced_accuracy_mean']:.3f} ± {row['balanced_accuracy_sd']:.3f} | "
            f"{row['macro_auc_mean']:.3f} ± {row['macro_auc_sd']:.3f} | {ratio} |"
        )
    if reference is not None:
        lines.append(f"| pooled full fine-tune (reference) | | {reference:.3f} | | |")
    return "\n".join(lines), rows


def plot_curve(rows: list[dict], reference: float | None, path: Path, title: str) -> None:
    """Balanced accuracy and macro AUC against epsilon (log axis), the no-noise recipe and the fine-tune as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    private = [row for row in rows if row["epsilon"] is not None]
    no_noise = next((row for row in rows if row["epsilon"] is None), None)
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, name in ((axes[0], "balanced_accuracy", "balanced accuracy"), (axes[1], "macro_auc", "macro AUC")):
        axis.errorbar([row["epsilon"] for row in private], [row[f"{key}_mean"] for row in private],
                      yerr=[row[f"{key}_sd"] for row in private], marker="o", capsize=3, label="DP linear head")
        if no_noise is not None:
            axis.axhline(no_noise[f"{key}_mean"], color="grey", linestyle="--", label="same recipe, no noise")
        if reference is not None and key == "balanced_accuracy":
            axis.axhline(reference, color="black", linestyle=":", label="pooled full fine-tune, no DP")
        if key == "balanced_accuracy":
            axis.axhline(1 / 7, color="red", linewidth=0.8, label="chance (1/7)")
        axis.set_xscale("log")
        axis.set_xlabel("epsilon (delta 1e-5)")
        axis.set_ylabel(name)
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) every cell of the curve, then write curve.md, curve.png and curve.json."""
    parser = argparse.ArgumentParser(prog="python -m simulation.privacy_curve", description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"HAM10000 folder (default {DEFAULT_DATA})")
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epsilons", default="1,3,8", help="comma-separated target epsilons; a no-noise cell is always run")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (head initialisation, Poisson sampling, noise)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the lesion-disjoint split, the same in every cell")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument(
        "--max-grad-norm", type=float, default=MAX_GRAD_NORM, help="per-image clipping norm (the features' norms are about 28 at 128 px)"
    )
    parser.add_argument("--head-steps-per-round", type=int)
    parser.add_argument("--head-batch-size", type=int)
    parser.add_argument("--head-learning-rate", type=float)
    parser.add_argument("--head-momentum", type=float)
    parser.add_argument("--output", type=Path, default=Path("runs/privacy-curve"), help="folder of the cells and the curve")
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("SKIN_FL_CACHE_DIR", Path.home() / ".cache" / "skin-fl")))
    args = parser.parse_args(argv)

    epsilons = [None] + [float(value) for value in args.epsilons.split(",") if value.strip()]
    seeds = [int(value) for value in args.seeds.split(",") if value.strip()]
    cells_folder = args.output / "cells"
    cells_folder.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    cells = []
    site_images, classes = natural_site_images(args.data, args.image_size, args.cache_dir, args.split_seed)
    _compute_features(args, site_images, classes)
    for seed in seeds:
        for epsilon in epsilons:
            path = cells_folder / f"eps-{_label(epsilon)}-seed-{seed}-{args.image_size}px.json"
            settings = _run_config(args, classes, epsilon, seed).privacy.model_dump(mode="json")
            if path.exists() and json.loads(path.read_text())["privacy"] == settings:
                cells.append(json.loads(path.read_text()))
                continue
            cell = run_cell(args, site_images, classes, epsilon, seed)
            path.write_text(json.dumps(cell, indent=2) + "\n")
            cells.append(cell)
            snr = ", ".join(f"{site} {entry['signal_to_noise_round_1']:.2f}" for site, entry in sorted(cell["sites"].items()))
            print(f"epsilon {_label(epsilon)}, seed {seed}: balanced accuracy {cell['balanced_accuracy']:.3f}, macro AUC "
                  f"{cell['macro_auc']:.3f} ({cell['wall_seconds']:.0f} s); signal-to-noise in round 1: {snr}", flush=True)
    reference = FINE_TUNE_REFERENCE.get(args.image_size)
    table, rows = summarise(cells, reference)
    title = (f"linear-head DP-SGD, {args.model} features at {args.image_size} px, 4 natural HAM10000 sites, "
             f"{args.rounds} FedAvg rounds, pooled test split, {len(seeds)} seeds")
    plot_curve(rows, reference, args.output / "curve.png", title)
    (args.output / "curve.md").write_text(f"{title}\n\n{table}\n")
    (args.output / "curve.json").write_text(json.dumps({"rows": rows, "load_before": load_before, "load_after": os.getloadavg()}, indent=2) + "\n")
    print(f"\n{title}\n{table}\nload average before {load_before}, after {os.getloadavg()}; written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
