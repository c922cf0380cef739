"""`skin-fl-bench`: a table of training arms x seeds on one dataset and partition, resumable, as CSV, Markdown and PNG."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from shared.config import DEFAULT_MODEL, FederationConfig, ModelConfig, PreprocessConfig, ReportConfig, RunConfig, TrainConfig
from shared.errors import SkinFLError
from shared.head_refit import HEAD_REFIT_STEPS
from shared.version import add_version_option
from simulation.arms import ARMS
from simulation.bench_table import write_table

DEFAULT_ARMS = ("local", "pooled", "fedavg", "fedprox", "fedadam", "fedavgm")


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of skin-fl-bench."""
    from simulation.cli import DEFAULT_CACHE_DIR

    train, federation = TrainConfig(), FederationConfig()
    parser = argparse.ArgumentParser(
        prog="skin-fl-bench",
        description="Compare training arms (local-only, pooled, FedAvg, FedProx, FedAdam, FedAvgM) over several seeds on "
        "the same lesion-disjoint splits. Finished arm x seed cells are kept in --out, so an interrupted table "
        "is completed by running the same command again.",
    )
    add_version_option(parser)
    parser.add_argument("--out", type=Path, required=True, help="results folder (cells/, table.csv, table.md, table.png)")
    parser.add_argument("--data", type=Path, help="dataset folder (default: the built-in demo dataset)")
    parser.add_argument("--format", choices=["ham10000", "isic2019", "isic2020", "folder"], help="dataset format (detected when omitted)")
    parser.add_argument("--partition", choices=["natural", "dirichlet"], help="natural (the data's site column) or dirichlet")
    parser.add_argument("--num-sites", type=int, help="sites of a dirichlet partition")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    parser.add_argument("--demo-images", type=int, default=700, help="images of the demo dataset (no --data)")
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=ARMS, help="arms to run, in order")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (the splits stay the same)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the lesion-disjoint splits shared by every cell")
    parser.add_argument("--rounds", type=int, default=8, help="rounds (federated) = epochs (pooled, local) x local epochs")
    parser.add_argument("--local-epochs", type=float, default=train.local_epochs)
    parser.add_argument(
        "--local-steps",
        default=None,
        help="optimiser steps per site per round: a number, or 'equal' (one pooled epoch shared equally by the sites); "
        "default: --local-epochs passes over each site's images",
    )
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--pretrained", default="default")
    parser.add_argument("--batch-size", type=int, default=train.batch_size)
    parser.add_argument("--lr", type=float, default=train.learning_rate)
    parser.add_argument("--balance", choices=["sampler", "global", "none"], default=train.balance)
    parser.add_argument("--loss", choices=["ce", "weighted-ce", "focal", "balanced-softmax"], default=train.loss)
    parser.add_argument("--label-smoothing", type=float, default=train.label_smoothing)
    parser.add_argument("--proximal-mu", type=float, default=federation.proximal_mu)
    parser.add_argument("--server-lr", type=float, default=federation.server_learning_rate, help="FedAdam server step size")
    parser.add_argument("--server-momentum", type=float, default=federation.server_momentum)
    parser.add_argument("--batch-norm", choices=["average", "recalibrate"], default=federation.batch_norm, help="BatchNorm statistics of the global model")
    parser.add_argument(
        "--head-refit-steps", type=int, default=HEAD_REFIT_STEPS,
        help="steps of the classification layer's refit a run takes before calibration (0: none; the table shows both)",
    )
    parser.add_argument(
        "--refit-layers", choices=["classification-layer", "last-stage"], default=federation.refit_layers,
        help="what the refit trains (the table's 'head refit' columns): the classification layer, or the last stage with it",
    )
    parser.add_argument(
        "--personalise-epochs", type=float, default=1.0, help="passes of each site's fine-tune in the personalised arm"
    )
    parser.add_argument("--personalise-lr", type=float, default=ReportConfig().personalise_learning_rate)
    parser.add_argument("--amp", choices=["auto", "on", "off"], default=train.amp)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--max-steps-per-epoch", type=int, help="cap optimiser steps per epoch (smoke runs)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    return parser


def bench_run_config(args: argparse.Namespace, classes: list[str], seed: int) -> RunConfig:
    """The validated settings of one cell."""
    try:
        return RunConfig(
            classes=classes,
            model=ModelConfig(name=args.model, pretrained=args.pretrained),
            preprocess=PreprocessConfig(image_size=args.image_size),
            train=TrainConfig(
                batch_size=args.batch_size,
                learning_rate=args.lr,
                local_epochs=args.local_epochs,
                local_steps=args.resolved_local_steps,
                balance=args.balance,
                loss=args.loss,
                label_smoothing=args.label_smoothing,
                amp=args.amp,
                device=args.device,
                num_workers=args.workers,
                max_steps_per_epoch=args.max_steps_per_epoch,
            ),
            federation=FederationConfig(
                rounds=args.rounds,
                proximal_mu=args.proximal_mu,
                server_learning_rate=args.server_lr,
                server_momentum=args.server_momentum,
                batch_norm=args.batch_norm,
                head_refit_steps=args.head_refit_steps,
                refit_layers=args.refit_layers,
                min_sites=1,
            ),
            report=ReportConfig(personalise_epochs=args.personalise_epochs, personalise_learning_rate=args.personalise_lr),
            seed=seed,
        )
    except ValueError as error:
        raise SkinFLError(f"invalid option: {error}") from error


def _settings(args: argparse.Namespace) -> dict:
    """What makes cells comparable: everything but the arms, seeds, output and cache folders."""
    skipped = {"out", "arms", "seeds", "cache_dir", "workers", "device", "resolved_local_steps"}
    return {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items() if key not in skipped}


def check_settings(out: Path, settings: dict) -> None:
    """Write the folder's settings, or refuse to mix cells of other settings into it."""
    path = out / "settings.json"
    if path.exists():
        # A setting added since the folder was written counts as its default there.
        defaults = _settings(build_parser().parse_args(["--out", str(out)]))
        saved = {**defaults, **json.loads(path.read_text())}
        changed = sorted(key for key in set(saved) | set(settings) if saved.get(key) != settings.get(key))
        if changed:
            raise SkinFLError(
                f"{out} holds cells run with other settings ({', '.join(f'{key}: {saved.get(key)!r} -> {settings.get(key)!r}' for key in changed)}); "
                "use another --out for these settings, or the same settings to complete that table"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def prepare_sites(args: argparse.Namespace):
    """Partition, split (with the split seed) and cache the sites once for every cell."""
    from shared.device import resolve_device
    from simulation.cli import load_table
    from simulation.sites import partition_sites, prepare_simulated_sites

    table = load_table(argparse.Namespace(data=args.data, format=args.format, skip_bad=False, demo_images=args.demo_images, cache_dir=args.cache_dir))
    names_sites = "site" in table.frame and (table.frame["site"] != "").all()
    partition = args.partition or ("natural" if names_sites else "dirichlet")
    num_sites = args.num_sites if args.num_sites is not None or partition == "natural" else 3
    split_run = bench_run_config(args, table.classes, args.split_seed)
    sites = partition_sites(table, partition=partition, num_sites=num_sites, alpha=args.alpha, column="site", seed=args.split_seed)
    simulated = prepare_simulated_sites(
        sites, split_run, run_folder=args.out / "splits", cache_root=Path(args.cache_dir) / "images", threads_per_site=1
    )
    print("Images per site and class:\n" + simulated.count_table)
    args.resolved_local_steps = resolve_local_steps(args.local_steps, simulated.images, args.batch_size)
    return table.classes, simulated.images, resolve_device(args.device)


def resolve_local_steps(value: str | None, site_images: dict, batch_size: int) -> int | None:
    """Steps per site per round from --local-steps: None, a number, or 'equal' (a pooled epoch over the sites)."""
    if value is None:
        return None
    if value == "equal":
        total = sum(len(images.select("train")) for images in site_images.values())
        return max(1, round(total / (batch_size * len(site_images))))
    if not value.isdigit() or int(value) < 1:
        raise SkinFLError(f"--local-steps {value!r} is neither a positive number nor 'equal'")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    """Run every missing arm x seed cell, then write the table."""
    args = build_parser().parse_args(argv)
    args.resolved_local_steps = None
    try:
        check_settings(args.out, _settings(args))
        from simulation.arms import ArmContext, run_arm

        classes, site_images, device = prepare_sites(args)
        cells = args.out / "cells"
        cells.mkdir(parents=True, exist_ok=True)
        todo = [(arm, seed) for arm in args.arms for seed in args.seeds]
        for number, (arm, seed) in enumerate(todo, start=1):
            path = cells / f"{arm}_seed{seed}.json"
            if path.exists():
                print(f"[{number}/{len(todo)}] {arm} seed {seed}: done earlier, kept ({path})")
                continue
            print(f"[{number}/{len(todo)}] {arm} seed {seed} on {device} ...", flush=True)
            started = time.monotonic()
            partial = path.with_suffix(".partial.pt")
            context = ArmContext(
                bench_run_config(args, classes, seed), site_images, device, log=lambda line: print(line, flush=True), partial_path=partial
            )
            result = run_arm(context, arm)
            temporary = path.with_suffix(".tmp")
            temporary.write_text(json.dumps(result.as_dict(), indent=1) + "\n")
            temporary.replace(path)
            partial.unlink(missing_ok=True)
            print(f"[{number}/{len(todo)}] {arm} seed {seed}: {time.monotonic() - started:.0f} s", flush=True)
        print(write_table(args.out, args.arms))
    except SkinFLError as error:
        print(f"skin-fl-bench: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
