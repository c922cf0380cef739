"""`skin-fl-sim`: simulate hospital sites on one machine and train the classifier with Flower."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shared.config import (
    DEFAULT_MODEL,
    FederationConfig,
    ModelConfig,
    PreprocessConfig,
    ReportConfig,
    RunConfig,
    TrackingConfig,
    TrainConfig,
)
from shared.console import configure_console
from shared.errors import SkinFLError
from shared.run_folder import RunFolder
from shared.version import add_version_option
from simulation.gan_options import add_gan_options, gan_config_from_args, print_gan_outcome
from simulation.privacy_options import add_privacy_options, print_privacy_outcome, print_privacy_plan, privacy_config_from_args

DEFAULT_CACHE_DIR = Path(os.environ.get("SKIN_FL_CACHE_DIR", Path.home() / ".cache" / "skin-fl"))
logger = logging.getLogger("skin_fl.sim")


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of skin-fl-sim."""
    train_defaults, federation_defaults = TrainConfig(), FederationConfig()
    parser = argparse.ArgumentParser(
        prog="skin-fl-sim",
        description="Simulate N hospital sites from one dataset and train the lesion classifier with "
        "federated averaging (Flower simulation engine). With no --data it runs on the built-in demo dataset.",
    )
    add_version_option(parser)
    parser.add_argument(
        "--config",
        type=Path,
        metavar="RUN.toml",
        help="run settings with a deployment's run-config keys (flat kebab-case, as deploy/run-config.example.toml); "
        "flags given on the command line override them",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, help="dataset folder (HAM10000, ISIC 2019, ISIC 2020 or folder-per-class)")
    data.add_argument("--format", choices=["ham10000", "isic2019", "isic2020", "folder"], help="dataset format (detected when omitted)")
    data.add_argument(
        "--partition",
        choices=["natural", "dirichlet"],
        help="natural: the data's own site column; dirichlet: non-IID over --num-sites (default: natural when the data names sites)",
    )
    data.add_argument("--num-sites", type=int, help="number of sites for --partition dirichlet")
    data.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (smaller = more skewed), default 0.5")
    data.add_argument("--partition-column", default="site", help="column naming the source site for natural partitions")
    data.add_argument("--skip-bad", action="store_true", help="leave out unreadable images and unknown labels, listing them, instead of stopping")
    data.add_argument("--demo-images", type=int, default=700, help="images in the built-in demo dataset (no --data)")
    data.add_argument("--image-size", type=int, help="square input size in pixels (default 128 on CPU, 224 on GPU)")
    data.add_argument("--colour-constancy", action="store_true", help="Shades-of-Gray colour constancy")
    data.add_argument("--clahe", action="store_true", help="CLAHE contrast equalisation")
    model = parser.add_argument_group("model and training")
    model.add_argument("--model", default=DEFAULT_MODEL, help=f"timm architecture (default {DEFAULT_MODEL})")
    model.add_argument("--pretrained", default="default", help="'default' (packaged ImageNet weights), 'none', or a local weights file")
    model.add_argument("--rounds", type=int, default=federation_defaults.rounds, help="federated rounds")
    model.add_argument("--local-epochs", type=float, default=train_defaults.local_epochs, help="local epochs per round")
    model.add_argument("--local-steps", type=int, help="optimiser steps per site per round, the same at every site (instead of --local-epochs)")
    model.add_argument("--label-smoothing", type=float, default=train_defaults.label_smoothing, help="label smoothing of the cross-entropy losses")
    model.add_argument("--batch-size", type=int, default=train_defaults.batch_size)
    model.add_argument("--lr", type=float, default=train_defaults.learning_rate, help="Adam learning rate at the start of the cosine schedule")
    model.add_argument("--strategy", choices=["fedavg", "fedprox", "fedadam", "fedavgm"], default="fedavg")
    model.add_argument("--proximal-mu", type=float, default=federation_defaults.proximal_mu, help="FedProx proximal weight")
    model.add_argument("--server-lr", type=float, default=federation_defaults.server_learning_rate, help="FedAdam server step size")
    model.add_argument("--server-momentum", type=float, default=federation_defaults.server_momentum, help="FedAvgM server momentum")
    model.add_argument(
        "--personalise-epochs",
        type=float,
        default=ReportConfig().personalise_epochs,
        help="each site also fine-tunes the final model on its own training split for this many passes and "
        "reports that personalised model beside the global one (0 = off)",
    )
    model.add_argument(
        "--select-model",
        choices=["best-validation", "last-round"],
        default=federation_defaults.select_model,
        help="model the run hands on: best round on the sites' validation splits (default) or the last round",
    )
    model.add_argument(
        "--early-stopping-patience",
        type=int,
        help="end the run after this many rounds without a better validation balanced accuracy (default: run every round)",
    )
    model.add_argument(
        "--batch-norm",
        choices=["average", "recalibrate"],
        default=federation_defaults.batch_norm,
        help="BatchNorm statistics of the global model: average the sites' own, or recalibrate (measured at the sites on the aggregated model)",
    )
    model.add_argument(
        "--no-prior-correction",
        dest="prior_correction",
        action="store_false",
        help="hand on the model without balancing its class prior on the sites' validation splits",
    )
    model.add_argument(
        "--head-refit-steps",
        type=int,
        help="refit the handed-on model's classification layer (or --refit-layers) over the sites' training images in this many steps "
        "(default: 30 without privacy, 0 = off; private runs allow only 0)",
    )
    model.add_argument(
        "--refit-layers",
        choices=["classification-layer", "last-stage"],
        default=FederationConfig().refit_layers,
        help="what the refit trains: the classification layer, or the last block stage with the head convolution and that layer",
    )
    model.add_argument("--fraction-train", type=float, default=1.0, help="fraction of sites that train each round")
    model.add_argument(
        "--balance",
        choices=["sampler", "global", "none"],
        help=f"class balancing (default: {train_defaults.balance}; none under --privacy local, whose sampling must stay uniform)",
    )
    model.add_argument("--loss", choices=["ce", "weighted-ce", "focal", "balanced-softmax"], default=train_defaults.loss)
    model.add_argument(
        "--amp", choices=["auto", "on", "off"], default=train_defaults.amp, help="mixed precision (auto: fp16 on CUDA, bf16 on CPU only where faster)"
    )
    model.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    model.add_argument("--max-steps-per-epoch", type=int, help="cap optimiser steps per epoch (quick runs)")
    model.add_argument("--seed", type=int, default=0)
    add_gan_options(parser)
    add_privacy_options(parser)
    output = parser.add_argument_group("run")
    output.add_argument("--centralised", action="store_true", help="also train the same model on the pooled data with the same budget and compare")
    output.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where run folders are written (default ./runs)")
    output.add_argument("--name", default="sim", help="suffix of the run folder name")
    output.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help=f"image and demo cache (default {DEFAULT_CACHE_DIR})")
    output.add_argument(
        "--tensorboard", action="store_true", help="also write per-round metrics as TensorBoard event files in RUN_FOLDER/tensorboard"
    )
    output.add_argument("-v", "--verbose", action="store_true", help="also show Flower's and Ray's own log (quiet by default)")
    output.add_argument("--threads-per-site", type=int, help="CPU threads of each simulated site (default: cores / sites, at least 1)")
    output.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_FOLDER",
        help="continue an interrupted run in RUN_FOLDER after its last completed round (its own sites and settings)",
    )
    return parser


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with a --config file's values as the defaults of their flags."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is not None:
        from simulation.config_file import apply_config_file

        try:
            file_settings = apply_config_file(parser, args.config)
        except SkinFLError as error:
            parser.error(str(error))
        args = parser.parse_args(argv)
        args.file_settings = file_settings
    return args


def run_config_from_args(args: argparse.Namespace, classes: list[str], device_image_size: int) -> RunConfig:
    """The validated run settings the command line (and its --config file) describe."""
    try:
        run = RunConfig(
            classes=classes,
            model=ModelConfig(name=args.model, pretrained=args.pretrained),
            preprocess=PreprocessConfig(
                image_size=args.image_size or device_image_size, colour_constancy=args.colour_constancy, clahe=args.clahe
            ),
            train=TrainConfig(
                batch_size=args.batch_size,
                learning_rate=args.lr,
                local_epochs=args.local_epochs,
                local_steps=args.local_steps,
                label_smoothing=args.label_smoothing,
                balance=args.balance or ("none" if args.privacy == "local" else TrainConfig().balance),
                loss=args.loss,
                amp=args.amp,
                device=args.device,
                max_steps_per_epoch=args.max_steps_per_epoch,
            ),
            federation=FederationConfig(
                rounds=args.rounds,
                strategy=args.strategy,
                proximal_mu=args.proximal_mu,
                server_learning_rate=args.server_lr,
                server_momentum=args.server_momentum,
                select_model=args.select_model,
                early_stopping_patience=args.early_stopping_patience,
                batch_norm=args.batch_norm,
                prior_correction=args.prior_correction,
                head_refit_steps=args.head_refit_steps,
                refit_layers=args.refit_layers,
                fraction_train=args.fraction_train,
                min_sites=1,
            ),
            gan=gan_config_from_args(args),
            privacy=privacy_config_from_args(args),
            report=ReportConfig(personalise_epochs=args.personalise_epochs),
            tracking=TrackingConfig(tensorboard=args.tensorboard),
            seed=args.seed,
        )
    except ValueError as error:
        raise SkinFLError(f"invalid option: {error}") from error
    if getattr(args, "file_settings", None):
        from simulation.config_file import with_file_settings

        run = with_file_settings(run, dict(args.file_settings), args.config)
    return run


def load_table(args: argparse.Namespace):
    """The dataset the command line names, or the built-in demo."""
    from shared.data.demo import ensure_demo_dataset
    from shared.data.readers import detect_format, read_dataset

    if args.data is None:
        root = ensure_demo_dataset(Path(args.cache_dir) / "demo", num_images=args.demo_images, seed=0)
        print(f"No --data given: using the built-in demo dataset ({args.demo_images} generated images) at {root}")
        return read_dataset(root, "ham10000")
    data_format = args.format or detect_format(args.data)
    table = read_dataset(args.data, data_format, skip_bad=args.skip_bad)
    if table.skipped:
        print(f"Skipped {len(table.skipped)} bad rows (--skip-bad):")
        for row in table.skipped:
            print(f"  {row.source}: {row.reason}")
    return table


def simulation_resources(num_sites: int, device_type: str, threads_per_site: int | None) -> tuple[int, dict]:
    """Threads per site and the Ray backend configuration that runs sites in parallel."""
    from shared.device import cpu_threads_per_process

    cores = os.cpu_count() or 1
    threads = threads_per_site or cpu_threads_per_process(num_sites)
    threads = min(threads, cores)
    client_resources = {"num_cpus": threads, "num_gpus": 0.0}
    if device_type == "cuda":
        client_resources["num_gpus"] = 1.0 / min(num_sites, 4)
    init_args = {"num_cpus": cores, "include_dashboard": False, "logging_level": logging.WARNING}
    return threads, {"client_resources": client_resources, "init_args": init_args}


@dataclass
class SimulationOutcome:
    """What a finished skin-fl-sim run produced."""

    run_folder: Path
    run: RunConfig
    sites: object
    summary: dict


def run_simulation_command(args: argparse.Namespace) -> SimulationOutcome:
    """Everything skin-fl-sim does: prepare sites, federate, optionally pool, print and save."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from shared.extras import require_extra

    require_extra("simulation", "the simulation engine (Ray)")
    from flwr.simulation import run_simulation

    configure_console(args.verbose)
    if args.resume is not None:
        from simulation.resume_run import resume_simulation_command

        return resume_simulation_command(args)

    from client.app import create_client_app
    from client.site_source import SimulationSites
    from server.app import create_server_app, new_run_folder
    from server.history import MetricHistory
    from shared.device import default_image_size, resolve_device
    from shared.durable_files import write_json_atomically
    from simulation.centralised import train_centralised
    from simulation.report import format_result_table, handed_on_model, site_metrics_from_flower
    from simulation.sites import partition_sites, prepare_simulated_sites

    device = resolve_device(args.device)
    table = load_table(args)
    run = run_config_from_args(args, table.classes, default_image_size(device))
    if run.tracking.tensorboard:
        require_extra("tracking", "--tensorboard")
    names_sites = args.partition_column in table.frame and (table.frame[args.partition_column] != "").all()
    partition = args.partition or ("natural" if names_sites else "dirichlet")
    if partition == "dirichlet" and args.num_sites is None:
        args.num_sites = 3
    sites = partition_sites(
        table, partition=partition, num_sites=args.num_sites, alpha=args.alpha, column=args.partition_column, seed=run.seed
    )
    run_folder = new_run_folder(args.runs_dir, args.name)
    threads, backend_config = simulation_resources(len(sites), device.type, args.threads_per_site)
    print(f"Run folder: {run_folder}")
    print(f"{len(sites)} sites ({partition} partition), {len(table)} images, classes {', '.join(run.classes)}")
    simulated = prepare_simulated_sites(
        sites, run, run_folder=run_folder, cache_root=Path(args.cache_dir) / "images", threads_per_site=threads, skip_bad=args.skip_bad
    )
    print("Images per site and class:\n" + simulated.count_table)
    print_privacy_plan(run, {site: len(images.select("train")) for site, images in simulated.images.items()})

    started = time.monotonic()
    run_simulation(
        server_app=create_server_app(run, run_folder, num_sites=len(sites)),
        client_app=create_client_app(SimulationSites(simulated.manifest_path)),
        num_supernodes=len(sites),
        backend_config=backend_config,
    )
    federated_seconds = time.monotonic() - started
    print_gan_outcome(run, run_folder)
    if run.gan.only:
        summary = {"gan_only": {"wall_seconds": federated_seconds, "rounds": run.gan.rounds}}
        write_json_atomically(RunFolder(run_folder).summary, summary)
        return SimulationOutcome(run_folder, run, simulated, summary)
    history = MetricHistory.load(run_folder)
    if not history.rounds:
        raise SkinFLError(f"the federation finished no round; see the site errors in the log above ({run_folder})")
    aggregate, per_site = history.handed_on_evaluation()
    if not per_site:
        raise SkinFLError(f"no site evaluated the global model; see the site errors in the log above ({run_folder})")
    summary = {"federated": {"wall_seconds": federated_seconds, "final": aggregate, "selected_round": history.selected_round}}
    print()
    print(
        format_result_table(
            f"Federated ({run.federation.strategy}, {run.federation.rounds} rounds x {run.train.local_epochs:g} local epochs) "
            f"- {handed_on_model(history)} on each site's test split",
            {site: site_metrics_from_flower(metrics) for site, metrics in per_site.items()},
            site_metrics_from_flower(aggregate),
        )
    )
    print(f"federated wall time: {federated_seconds:.1f} s")
    print_privacy_outcome(run, run_folder, summary)
    if args.centralised:
        pooled = train_centralised(run, simulated.images, run_folder)
        summary["centralised"] = {"wall_seconds": pooled["wall_seconds"], "final": pooled["final"]["evaluate"]}
        print()
        print(
            format_result_table(
                f"Pooled (centralised, {run.federation.rounds * run.train.local_epochs:g} epochs) - same test splits",
                pooled["final"]["sites"],
                pooled["final"]["evaluate"],
            )
        )
        print(f"pooled wall time: {pooled['wall_seconds']:.1f} s; federated / pooled: {federated_seconds / pooled['wall_seconds']:.2f}x")
    write_json_atomically(RunFolder(run_folder).summary, summary)
    print(f"\nRun folder: {run_folder} (config, per-round and per-site metrics, metrics.png, final_model.pt)")
    return SimulationOutcome(run_folder, run, simulated, summary)


def main(argv: list[str] | None = None) -> int:
    """Entry point of skin-fl-sim."""
    args = parse_arguments(argv)
    try:
        run_simulation_command(args)
    except SkinFLError as error:
        print(f"skin-fl-sim: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
