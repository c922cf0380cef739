"""Ablation: does federated cGAN augmentation help the rare classes? none / sampler / cGAN / both on HAM10000's four sites.

All four arms run the same federated classifier budget and seed on the same lesion-disjoint
splits; the GAN is trained once (federated, GAN-only run) and both cGAN arms augment with that
same generator. GAN quality is measured in the penultimate features of arm (b)'s federated
classifier, which was trained on real training images only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from shared.run_folder import RunFolder
from simulation.cli import build_parser, run_simulation_command
from simulation.gan_options import rejection_summary

DEFAULT_DATA = Path(os.environ.get("SKIN_FL_HAM10000_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000"))
RARE_CLASSES = ("df", "vasc", "akiec")
ARMS = {
    "a_none": {"balance": "none", "augment": False},
    "b_sampler": {"balance": "sampler", "augment": False},
    "c_cgan": {"balance": "none", "augment": True},
    "d_both": {"balance": "sampler", "augment": True},
}


def _common(args: argparse.Namespace, name: str) -> list[str]:
    return [
        "--data", str(args.data), "--format", "ham10000", "--partition", "natural",
        "--image-size", str(args.image_size), "--rounds", str(args.rounds), "--batch-size", str(args.batch_size),
        "--max-steps-per-epoch", str(args.max_steps), "--seed", str(args.seed),
        "--runs-dir", str(args.runs_dir), "--name", name, "--cache-dir", str(args.cache_dir),
    ]


def _gan_options(args: argparse.Namespace) -> list[str]:
    return [
        "--gan-image-size", str(args.gan_image_size), "--gan-channels", str(args.gan_channels),
        "--gan-batch-size", str(args.gan_batch_size), "--gan-local-steps", str(args.gan_local_steps),
    ]


def rare_class_summary(metrics: dict, classes: list[str]) -> dict:
    """Balanced accuracy, per-class recall and macro recall over the rare classes of one evaluation."""
    recall = {name: float(metrics["per_class"][name]["recall"]) for name in classes}
    support = {name: int(metrics["per_class"][name]["support"]) for name in classes}
    return {
        "balanced_accuracy": float(metrics["balanced_accuracy"]),
        "accuracy": float(metrics["accuracy"]),
        "macro_auc": metrics["macro_auc"],
        "recall": recall,
        "support": support,
        "rare_macro_recall": float(np.mean([recall[name] for name in RARE_CLASSES])),
    }


def gan_quality(generator_path: Path, feature_model_path: Path, site_images: dict, *, tstr_per_class: int, seed: int) -> dict:
    """Per-class Fréchet distance (pooled real training images vs generated) and train-synthetic/test-real recall."""
    from shared.data.cache import concatenate
    from shared.gan.features import classifier_features
    from shared.gan.models import load_gan
    from shared.gan.quality import per_class_frechet, train_on_synthetic_test_on_real
    from shared.gan.training import at_gan_resolution, generate, to_uint8_hwc
    from shared.models.classifier import load_classifier

    generator, _, saved = load_gan(generator_path)
    feature_model, feature_saved = load_classifier(feature_model_path)
    size = feature_saved.preprocess.image_size
    real_train = concatenate([images.select("train") for images in site_images.values()])
    real_test = concatenate([images.select("test") for images in site_images.values()])
    rng = np.random.default_rng(seed)
    # Up to 200 real images per class keep the feature pass affordable on a CPU.
    rows = np.sort(np.concatenate([rng.permutation(np.flatnonzero(real_train.labels == k))[:200] for k in range(len(saved.classes))]))
    real_labels = real_train.labels[rows]
    fake_labels = real_labels.copy()
    real_features = classifier_features(feature_model, at_gan_resolution(np.asarray(real_train.images[rows]), saved.image_size), image_size=size)
    fake_features = classifier_features(feature_model, to_uint8_hwc(generate(generator, fake_labels, seed=seed)), image_size=size)
    fd = per_class_frechet(real_features, real_labels, fake_features, fake_labels, saved.classes)
    tstr = train_on_synthetic_test_on_real(
        generator, real_test, per_class=tstr_per_class, model_name=feature_saved.model_name, image_size=size, seed=seed
    )
    return {
        "feature_space": f"penultimate features of {feature_model_path} ({feature_saved.model_name}, trained on real images)",
        "frechet_distance": fd,
        "real_images_per_class": {name: int((real_labels == k).sum()) for k, name in enumerate(saved.classes)},
        "tstr": rare_class_summary(tstr, saved.classes),
    }


def format_table(results: dict, classes: list[str]) -> str:
    """The ablation as a Markdown table: balanced accuracy, rare macro recall, per-class recall."""
    header = ["arm", "bal. acc", "rare macro recall", *[f"{name} rec" for name in classes], "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, result in results.items():
        row = [arm, f"{result['balanced_accuracy']:.3f}", f"{result['rare_macro_recall']:.3f}"]
        row += [f"{result['recall'][name]:.2f}" for name in classes]
        row.append(f"{result['wall_seconds']:.0f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def build_ablation_parser() -> argparse.ArgumentParser:
    """The ablation's options: data, the classifier's and the GAN's budgets, seeds and folders."""
    parser = argparse.ArgumentParser(prog="python -m simulation.gan_ablation", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"HAM10000 folder (default {DEFAULT_DATA})")
    parser.add_argument("--image-size", type=int, default=64, help="classifier input side (default 64)")
    parser.add_argument("--rounds", type=int, default=2, help="federated classifier rounds per arm")
    parser.add_argument("--max-steps", type=int, default=20, help="optimiser steps per site and round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--gan-rounds", type=int, default=6)
    parser.add_argument("--gan-local-steps", type=int, default=20)
    parser.add_argument("--gan-image-size", type=int, default=32, choices=[32, 64, 128])
    parser.add_argument("--gan-channels", type=int, default=32)
    parser.add_argument("--gan-batch-size", type=int, default=32)
    parser.add_argument("--tstr-per-class", type=int, default=32, help="generated images per class for train-on-synthetic")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (each trains its own GAN and four arms; default 0)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs") / "gan-ablation")
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("SKIN_FL_CACHE_DIR", Path.home() / ".cache" / "skin-fl")))
    return parser


def run_seed(args: argparse.Namespace, seed: int, folder: Path) -> dict:
    """The GAN phase once and the four classifier arms for one seed; the comparison is printed and saved in `folder`."""
    from simulation.benchmark import evaluate_on_pooled_test

    args = argparse.Namespace(**{**vars(args), "seed": seed, "runs_dir": folder})
    started = time.monotonic()
    results: dict[str, dict] = {}
    outcomes = {}

    def run_arm(arm: str, extra: list[str]) -> None:
        settings = ARMS[arm]
        options = _common(args, f"ablation-{arm}") + ["--balance", settings["balance"]] + extra
        arm_started = time.monotonic()
        outcome = run_simulation_command(build_parser().parse_args(options))
        metrics = evaluate_on_pooled_test(RunFolder(outcome.run_folder).final_model, outcome.sites.images)
        results[arm] = rare_class_summary(metrics, outcome.run.classes)
        results[arm]["wall_seconds"] = time.monotonic() - arm_started
        results[arm]["run_folder"] = str(outcome.run_folder)
        outcomes[arm] = outcome
        # Written after every arm, so an interrupted ablation still leaves its finished arms.
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ablation_arms.json").write_text(json.dumps(results, indent=2) + "\n")

    run_arm("a_none", [])
    run_arm("b_sampler", [])
    feature_model = RunFolder(results["b_sampler"]["run_folder"]).final_model
    gan_started = time.monotonic()
    gan_outcome = run_simulation_command(
        build_parser().parse_args(
            _common(args, "ablation-gan") + _gan_options(args)
            + ["--gan-rounds", str(args.gan_rounds), "--gan-only", "--gan-grid-every", str(max(1, args.gan_rounds // 2)),
               "--gan-feature-classifier", str(feature_model)]
        )
    )
    gan_seconds = time.monotonic() - gan_started
    generator = RunFolder(gan_outcome.run_folder).gan_checkpoint(args.gan_rounds)
    augment = _gan_options(args) + ["--gan-augment", "--gan-generator", str(generator), "--gan-feature-classifier", str(feature_model)]
    run_arm("c_cgan", augment)
    run_arm("d_both", augment)
    classes = outcomes["b_sampler"].run.classes
    quality = gan_quality(generator, feature_model, outcomes["b_sampler"].sites.images, tstr_per_class=args.tstr_per_class, seed=seed)
    both = RunFolder(results["d_both"]["run_folder"])
    synthetic_counts = both.synthetic_counts.read_text()
    selection = json.loads(both.gan_selection.read_text())

    table = format_table(results, classes)
    test_support = results["b_sampler"]["support"]
    lines = [
        f"GAN ablation on HAM10000, 4 natural sites, seed {seed}: classifier {args.image_size} px, {args.rounds} rounds x "
        f"{args.max_steps} steps x batch {args.batch_size} per site; GAN {args.gan_image_size} px, {args.gan_rounds} rounds x "
        f"{args.gan_local_steps} steps ({gan_seconds:.0f} s). Pooled lesion-disjoint test split, support {test_support}.",
        "",
        table,
        "",
        f"(d) - (b) rare macro recall: {results['d_both']['rare_macro_recall'] - results['b_sampler']['rare_macro_recall']:+.3f} (target >= +0.03)",
        "",
        f"GAN quality ({quality['feature_space']}):",
        "Fréchet distance per class: " + ", ".join(f"{k} {v:.1f}" if v is not None else f"{k} -" for k, v in quality["frechet_distance"].items()),
        "Train-on-synthetic / test-on-real recall: " + ", ".join(f"{k} {v:.2f}" for k, v in quality["tstr"]["recall"].items())
        + f" (balanced accuracy {quality['tstr']['balanced_accuracy']:.3f})",
        "",
        "Synthetic images added per site (arm d):",
        synthetic_counts.rstrip(),
        "Rejections per site: " + "; ".join(f"{site} {rejection_summary(report)}" for site, report in sorted(selection.items())),
        f"total wall time {time.monotonic() - started:.0f} s",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ablation.md").write_text(text + "\n")
    ablation = {
        "settings": vars(args) | {"data": str(args.data), "runs_dir": str(folder), "cache_dir": str(args.cache_dir)},
        "arms": results,
        "gan": {"run_folder": str(gan_outcome.run_folder), "generator": str(generator), "wall_seconds": gan_seconds,
                "quality": quality, "selection": selection},
    }
    (folder / "ablation.json").write_text(json.dumps(ablation, indent=2, default=str) + "\n")
    print(f"written to {folder / 'ablation.md'} and ablation.json")
    return ablation


def _mean_sd(values: list[float]) -> str:
    values = [value for value in values if value is not None]
    if not values:
        return "-"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def summarise_seeds(ablations: dict[int, dict]) -> str:
    """Mean ± sd over seeds of every arm's balanced accuracy and rare-class macro recall, (d) - (b), and the GAN's quality."""
    seeds = sorted(ablations)
    header = "| arm | seeds | bal. acc | rare macro recall | " + " | ".join(f"{name} rec" for name in RARE_CLASSES) + " |"
    lines = [f"GAN ablation over seeds {', '.join(map(str, seeds))} (mean ± sd)", "", header, "|" + "---|" * (4 + len(RARE_CLASSES))]
    for arm in ARMS:
        arms = [ablations[seed]["arms"][arm] for seed in seeds]
        cells = [_mean_sd([result["balanced_accuracy"] for result in arms]), _mean_sd([result["rare_macro_recall"] for result in arms])]
        cells += [_mean_sd([result["recall"][name] for result in arms]) for name in RARE_CLASSES]
        lines.append(f"| {arm} | {len(arms)} | " + " | ".join(cells) + " |")
    gains = [ablations[seed]["arms"]["d_both"]["rare_macro_recall"] - ablations[seed]["arms"]["b_sampler"]["rare_macro_recall"] for seed in seeds]
    overall = [ablations[seed]["gan"]["quality"]["frechet_distance"].get("all") for seed in seeds]
    tstr = [ablations[seed]["gan"]["quality"]["tstr"]["balanced_accuracy"] for seed in seeds]
    lines += [
        "",
        f"(d) - (b) rare macro recall per seed: {', '.join(f'{gain:+.3f}' for gain in gains)}; mean {_mean_sd(gains)} "
        "(the goal: +0.03 on every seed)",
        f"GAN: Fréchet distance overall {_mean_sd(overall)}; train-on-synthetic / test-on-real balanced accuracy {_mean_sd(tstr)}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run every seed's GAN phase and four arms (seeds already in the folder are kept), then the table over seeds."""
    args = build_ablation_parser().parse_args(argv)
    ablations = {}
    for seed in args.seeds:
        folder = Path(args.runs_dir) / f"seed{seed}"
        done = folder / "ablation.json"
        if done.is_file():
            print(f"seed {seed}: done earlier, kept ({done})")
            ablations[seed] = json.loads(done.read_text())
            continue
        ablations[seed] = run_seed(args, seed, folder)
    text = summarise_seeds(ablations)
    print("\n" + text)
    (Path(args.runs_dir) / "ablation_seeds.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
