"""skin-fl-sim's federated-GAN options: the command-line group, its GanConfig, and the printed outcome."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shared.config import GanConfig, RunConfig
from shared.run_folder import RunFolder


def add_gan_options(parser: argparse.ArgumentParser) -> None:
    """Add the 'federated GAN' option group to skin-fl-sim."""
    defaults = GanConfig()
    gan = parser.add_argument_group("federated conditional GAN (synthetic minority-class images)")
    gan.add_argument("--gan-rounds", type=int, default=defaults.rounds, help="federated GAN rounds before the classifier rounds (default 0: no GAN)")
    gan.add_argument("--gan-only", action="store_true", help="train the GAN only (no classifier rounds)")
    gan.add_argument("--gan-generator", help="GAN checkpoint to start from, or (with --gan-rounds 0) to augment with")
    gan.add_argument("--gan-start-round", type=int, default=1, help="first GAN round (resuming: the checkpoint's round + 1)")
    gan.add_argument("--gan-image-size", type=int, default=defaults.image_size, choices=[32, 64, 128], help="generated image side")
    gan.add_argument("--gan-channels", type=int, default=defaults.channels, help="base channel width of G and D")
    gan.add_argument("--gan-local-steps", type=int, default=defaults.local_steps, help="D+G steps per site per GAN round")
    gan.add_argument("--gan-batch-size", type=int, default=defaults.batch_size)
    gan.add_argument("--gan-lr", type=float, default=defaults.generator_learning_rate, help="Adam rate of G and D")
    gan.add_argument("--gan-amp", choices=["auto", "on", "off"], default=defaults.amp, help="GAN mixed precision")
    gan.add_argument(
        "--gan-diff-augment", nargs="*", choices=["color", "translation", "cutout"], default=defaults.diff_augment,
        help="differentiable augmentations of every image the discriminator sees (none given: no augmentation)",
    )
    gan.add_argument("--gan-grid-every", type=int, default=defaults.grid_every, help="sample grid and Fréchet distance every K GAN rounds")
    gan.add_argument("--gan-augment", action="store_true", help="add selected synthetic images of minority classes to each site's training split")
    gan.add_argument(
        "--gan-target", choices=["median", "ratio"], default=defaults.target, help="fill classes up to the site's median count, or ratio x its largest"
    )
    gan.add_argument("--gan-target-ratio", type=float, default=defaults.target_ratio)
    gan.add_argument("--gan-max-per-class", type=int, default=defaults.max_synthetic_per_class, help="cap on synthetic images per class and site")
    gan.add_argument("--gan-feature-classifier", help="saved classifier whose features measure and select (default: the run's initial classifier)")


def gan_config_from_args(args: argparse.Namespace) -> GanConfig:
    """The GanConfig the GAN options describe (validated by pydantic)."""
    return GanConfig(
        rounds=args.gan_rounds,
        only=args.gan_only,
        generator=args.gan_generator,
        start_round=args.gan_start_round,
        image_size=args.gan_image_size,
        channels=args.gan_channels,
        local_steps=args.gan_local_steps,
        batch_size=args.gan_batch_size,
        generator_learning_rate=args.gan_lr,
        discriminator_learning_rate=args.gan_lr,
        amp=args.gan_amp,
        diff_augment=args.gan_diff_augment,
        grid_every=args.gan_grid_every,
        augment=args.gan_augment,
        target=args.gan_target,
        target_ratio=args.gan_target_ratio,
        max_synthetic_per_class=args.gan_max_per_class,
        feature_classifier=args.gan_feature_classifier,
    )


def rejection_summary(report: dict) -> str:
    """A site's selection rejections as sent to the coordinator ("rejected unrealistic 12, memorised 0, ..."), or '-' when not sent."""
    rejected = {key.removeprefix("rejected-"): value for key, value in report.items() if key.startswith("rejected-")}
    return "rejected " + ", ".join(f"{reason} {count}" for reason, count in rejected.items()) if rejected else "-"


def print_gan_outcome(run: RunConfig, run_folder: Path) -> None:
    """Print the GAN rounds' losses and Fréchet distances and the synthetic counts, when the run had a GAN phase."""
    layout = RunFolder(run_folder)
    if layout.gan_history.is_file():
        print("\nFederated GAN rounds (site-weighted means; FD in the feature classifier's penultimate features):")
        for entry in layout.gan_history_rounds():
            fd = f"{entry['frechet-distance']:.2f}" if "frechet-distance" in entry else "-"
            print(
                f"  round {entry['round']:3d}: D loss {entry['discriminator-loss']:.3f}  G loss {entry['generator-loss']:.3f}  "
                f"FD {fd}  {entry['wall_seconds']:.1f} s"
            )
        print(f"GAN checkpoints and grids: {layout.gan}")
    counts = layout.synthetic_counts
    if counts.is_file():
        print("\nReal and synthetic training images per site (synthetic_counts.csv):")
        print(counts.read_text().rstrip())
        selection = json.loads(layout.gan_selection.read_text())
        for site, report in sorted(selection.items()):
            if "candidates" in report:
                print(f"  {site}: {report['candidates']} candidates, {rejection_summary(report)}")
