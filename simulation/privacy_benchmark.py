"""Benchmark of DP-SGD on HAM10000's four natural sites: step time against plain training, accuracy at several epsilons.

It measures the fine-tune recipe (images through the network); `simulation.privacy_curve` measures the linear-head default.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from shared.run_folder import RunFolder
from simulation.benchmark import DEFAULT_DATA, evaluate_on_pooled_test
from simulation.cli import build_parser, run_simulation_command
from simulation.sites import natural_site_images

ARCHITECTURES = ("tf_efficientnet_lite0", "resnet18", "efficientnet_b0")
MODES = ("hooks", "functorch", "ghost")


def _site_training_images(data: Path, image_size: int, cache_dir: Path, seed: int):
    """The training split of the largest natural site, from the same cache the simulations use."""
    site_images, classes = natural_site_images(data, image_size, cache_dir, seed)
    name = max(site_images, key=lambda site: len(site_images[site].select("train")))
    return name, site_images[name].select("train"), classes


class StepTimer:
    """Seconds per optimiser step of plain training (BatchNorm model) or DP-SGD (prepared model) on real images."""

    def __init__(
        self, architecture: str, images, classes, *, private: bool, mode: str, batch_size: int, amp: str, pretrained: str,
        trainable_stages: int | None = None,
    ) -> None:
        import torch

        from shared.config import RunConfig
        from shared.local_training import precision_for
        from shared.models.classifier import build_classifier
        from shared.privacy.model_preparation import prepare_for_private_training

        self.architecture, self.images, self.classes = architecture, images, classes
        self.private, self.mode, self.batch_size, self.amp = private, mode, batch_size, amp
        self.trainable_stages = trainable_stages
        self.device = torch.device("cpu")
        self.model = build_classifier(RunConfig(classes=classes, model={"name": architecture, "pretrained": pretrained}).model, len(classes))
        if private:
            prepare_for_private_training(self.model, trainable_stages)
        self.precision = precision_for(self.model, self._run(1).train, self.device, int(images.images.shape[1]), private=private)
        self.calls = 0

    def _run(self, steps: int):
        from shared.config import RunConfig

        privacy = {
            "mode": "local", "noise_multiplier": 1.0, "target_delta": 1e-5, "max_grad_norm": 1.0, "grad_sample_mode": self.mode,
            "trainable_stages": self.trainable_stages, "recipe": "fine-tune",
        }
        return RunConfig(
            classes=self.classes,
            model={"name": self.architecture, "pretrained": "none"},
            preprocess={"image_size": int(self.images.images.shape[1])},
            train={"batch_size": self.batch_size, "balance": "none", "max_steps_per_epoch": steps, "amp": self.amp, "progress": False, "augment": False},
            federation={"rounds": 1},
            privacy=privacy if self.private else {},
        )

    def seconds_per_step(self, steps: int) -> float:
        """Train `steps` steps and return the mean seconds of one (setup excluded)."""
        from shared.local_training import train_on_images
        from shared.privacy.accounting import PrivacyLedger
        from shared.privacy.training import train_privately

        run = self._run(steps)
        self.calls += 1
        common = dict(device=self.device, precision=self.precision, learning_rate_start=1e-4, learning_rate_end=1e-4, seed=self.calls)
        if self.private:
            with tempfile.TemporaryDirectory() as folder:
                ledger = PrivacyLedger.open(Path(folder), "timing", "timing", 1e-5)
                result = train_privately(self.model, self.images, run=run, ledger=ledger, server_round=1, **common)
        else:
            result = train_on_images(self.model, self.images, config=run.train, **common)
        return result.seconds / result.steps


def interleaved_seconds(timers: dict, steps: int, repeats: int) -> dict[str, float]:
    """Fastest seconds per step of each timer over `repeats` alternating calls, after one warm-up step each.

    Alternating and taking the fastest call keeps other jobs on a shared machine from landing on
    one configuration only.
    """
    for timer in timers.values():
        timer.seconds_per_step(1)
    best = {name: float("inf") for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            best[name] = min(best[name], timer.seconds_per_step(steps))
    return best


def federated_accuracy(args, epsilon: float | None, site_images_holder: dict) -> dict:
    """Balanced accuracy on the pooled test split after a federated run (DP-SGD at `epsilon`, or none)."""
    options = [
        "--data", str(args.data), "--format", "ham10000", "--partition", "natural",
        "--rounds", str(args.rounds), "--local-epochs", "1", "--image-size", str(args.image_size),
        "--batch-size", str(args.batch_size), "--max-steps-per-epoch", str(args.max_steps_per_epoch),
        "--balance", "none", "--loss", "weighted-ce", "--lr", str(args.lr), "--model", args.model,
        "--runs-dir", str(args.runs_dir), "--cache-dir", str(args.cache_dir), "--seed", str(args.seed),
        "--name", "privacy-none" if epsilon is None else f"privacy-eps{epsilon}" + ("" if args.trainable_stages is None else f"-stages{args.trainable_stages}"),
    ]
    if epsilon is not None:
        options += [
            "--privacy", "local", "--dp-recipe", "fine-tune", "--target-epsilon", str(epsilon), "--target-delta", str(args.delta),
            "--max-grad-norm", str(args.max_grad_norm),
        ]
        if args.trainable_stages is not None:
            options += ["--trainable-stages", str(args.trainable_stages)]
    started = time.monotonic()
    outcome = run_simulation_command(build_parser().parse_args(options))
    wall = time.monotonic() - started
    site_images_holder.update(outcome.sites.images)
    metrics = evaluate_on_pooled_test(RunFolder(outcome.run_folder).final_model, outcome.sites.images)
    privacy = outcome.summary.get("privacy", {})
    return {
        "epsilon_target": epsilon,
        "epsilon_spent_max": privacy.get("epsilon_spent_max"),
        "balanced_accuracy": metrics["balanced_accuracy"],
        "accuracy": metrics["accuracy"],
        "macro_auc": metrics["macro_auc"],
        "test_images": metrics["num_examples"],
        "wall_seconds": wall,
        "run_folder": str(outcome.run_folder),
    }


def step_time_figures(args) -> dict:
    """DP vs plain seconds per step of the chosen model and, with --modes, of every mode and architecture."""
    from shared.privacy.model_preparation import grad_sample_mode_for

    figures: dict = {}
    site, images, classes = _site_training_images(args.data, args.timing_image_size, args.cache_dir, args.seed)
    print(f"step time on {site}'s training split ({len(images)} images), {args.timing_image_size} px, batch {args.batch_size}")
    mode = grad_sample_mode_for(args.model)
    common = dict(batch_size=args.batch_size, amp="auto", pretrained="default")
    timers = {
        "plain": StepTimer(args.model, images, classes, private=False, mode=mode, **common),
        "dp": StepTimer(args.model, images, classes, private=True, mode=mode, **common),
    }
    if args.trainable_stages is not None:
        timers["dp-partial"] = StepTimer(args.model, images, classes, private=True, mode=mode, trainable_stages=args.trainable_stages, **common)
    seconds = interleaved_seconds(timers, args.timing_steps, args.timing_repeats)
    figures["step_time"] = {
        "model": args.model, "mode": mode, "image_size": args.timing_image_size, "batch_size": args.batch_size,
        "seconds_per_step": seconds, "precision": {name: timer.precision.name for name, timer in timers.items()},
        "ratio_dp_over_plain": seconds["dp"] / seconds["plain"],
        "trainable_stages": args.trainable_stages,
    }
    print(f"{args.model}: plain {seconds['plain']:.3f} s/step ({timers['plain'].precision.name}), DP-SGD ({mode}, every layer) "
          f"{seconds['dp']:.3f} s/step ({timers['dp'].precision.name}): {figures['step_time']['ratio_dp_over_plain']:.2f}x (target <= 2x)")
    if "dp-partial" in seconds:
        figures["step_time"]["ratio_dp_partial_over_plain"] = seconds["dp-partial"] / seconds["plain"]
        print(f"  DP-SGD training the last {args.trainable_stages} stage(s) and the head: {seconds['dp-partial']:.3f} s/step "
              f"({timers['dp-partial'].precision.name}): {figures['step_time']['ratio_dp_partial_over_plain']:.2f}x plain (every layer)")

    if args.modes:
        _, small, _ = _site_training_images(args.data, args.mode_image_size, args.cache_dir, args.seed)
        figures["modes"] = {}
        for architecture in ARCHITECTURES:
            options = dict(batch_size=args.mode_batch_size, amp="off", pretrained="none")
            timers = {"plain": StepTimer(architecture, small, classes, private=False, mode="hooks", **options)}
            timers.update({candidate: StepTimer(architecture, small, classes, private=True, mode=candidate, **options) for candidate in MODES})
            row = interleaved_seconds(timers, 1, args.timing_repeats)
            figures["modes"][architecture] = row
            print(f"{architecture} ({args.mode_image_size} px, batch {args.mode_batch_size}, fp32) s/step: "
                  + ", ".join(f"{key} {value:.3f}" for key, value in row.items()))
    return figures


def main(argv: list[str] | None = None) -> int:
    """Run the step-time comparison and the accuracy-at-epsilon runs; print and save the figures."""
    parser = argparse.ArgumentParser(prog="python -m simulation.privacy_benchmark", description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"HAM10000 folder (default {DEFAULT_DATA})")
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--timing-image-size", type=int, default=128, help="input size of the DP vs plain step-time figure")
    parser.add_argument("--timing-steps", type=int, default=2, help="steps per timed call (after one warm-up step)")
    parser.add_argument("--timing-repeats", type=int, default=3, help="alternating timed calls per configuration; the fastest counts")
    parser.add_argument("--mode-batch-size", type=int, default=16)
    parser.add_argument("--skip-timing", action="store_true", help="only the accuracy runs")
    parser.add_argument("--skip-baseline", action="store_true", help="no accuracy run without DP")
    parser.add_argument("--modes", action="store_true", help="also time hooks / functorch / ghost for every offered architecture")
    parser.add_argument("--mode-image-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-steps-per-epoch", type=int, default=25)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--epsilons", default="1,3,8", help="comma-separated target epsilons ('' skips the accuracy runs)")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument(
        "--trainable-stages", type=int, default=None,
        help="DP runs train only the last N stages and the head (0 = head only); also timed against plain training",
    )
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("SKIN_FL_CACHE_DIR", Path.home() / ".cache" / "skin-fl")))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("privacy_benchmark.json"))
    args = parser.parse_args(argv)
    import shared  # noqa: F401 - the torchvision shim before timm

    report: dict = {"load_before": os.getloadavg()}
    if not args.skip_timing:
        report.update(step_time_figures(args))
    epsilons = [float(value) for value in args.epsilons.split(",") if value.strip()]
    if epsilons:
        holder: dict = {}
        baseline = [] if args.skip_baseline else [federated_accuracy(args, None, holder)]
        report["accuracy"] = baseline + [federated_accuracy(args, epsilon, holder) for epsilon in epsilons]
        trained = "every layer" if args.trainable_stages is None else f"DP runs train the last {args.trainable_stages} stage(s) and the head"
        print(f"\nbalanced accuracy ({trained}), pooled lesion-disjoint test split, {args.model}, {args.rounds} rounds x "
              f"{args.max_steps_per_epoch} steps x batch {args.batch_size}, {args.image_size} px, delta {args.delta}")
        for row in report["accuracy"]:
            label = "no DP" if row["epsilon_target"] is None else f"eps {row['epsilon_target']:g}"
            spent = "" if row["epsilon_spent_max"] is None else f" (spent {row['epsilon_spent_max']:.2f})"
            print(f"{label:>8s}{spent:16s} balanced acc {row['balanced_accuracy']:.3f}  accuracy {row['accuracy']:.3f}  "
                  f"macro AUC {row['macro_auc']:.3f}  wall {row['wall_seconds']:.0f} s")
    report["load_after"] = os.getloadavg()
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"load average before {report['load_before']}, after {report['load_after']}; written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
