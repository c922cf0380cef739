"""`skin-fl-server`: start the coordinator (SuperLink behind nginx), submit runs, show status and history, stop runs."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from coordinator.deployment import (
    CONNECTION_NAME,
    LOOPBACK,
    DeploymentError,
    ServerState,
    StateLayout,
    check_credentials,
    flower_error,
    prepare_coordinator,
    run_flower_cli,
)
from coordinator.nginx_proxy import ProxySettings, render_config
from server.run_config_file import RESUME_KEY, app_directory, read_run_config_file, write_run_config_file
from shared.console import VERBOSE_ENV
from shared.errors import ConfigError, SkinFLError
from shared.run_folder import RunFolder
from shared.version import add_version_option

STATE_DIR_ENV = "SKIN_FL_SERVER_STATE"
DEFAULT_STATE_DIR = Path.home() / ".local" / "state" / "skin-fl-server"
DEFAULT_PUBLIC_PORT = 9443
DEFAULT_SUPERLINK_PORT = 9444
INSECURE_WARNING = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!! --insecure: NO TLS and NO node authentication. Weights and metrics travel in clear  !!
!! text and ANY machine that reaches the port can join as a site. Local development   !!
!! only; never use this with real patient data or across a network.                   !!
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of skin-fl-server."""
    parser = argparse.ArgumentParser(
        prog="skin-fl-server",
        description="Run the skin-fl federation server for the coordinator: the Flower SuperLink on loopback "
        "behind an nginx TLS proxy that lets sites reach only the Fleet API; submit runs and follow them.",
    )
    add_version_option(parser)
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get(STATE_DIR_ENV, DEFAULT_STATE_DIR)),
        help=f"server state: run folders, site-key record, logs (default ${STATE_DIR_ENV} or {DEFAULT_STATE_DIR})",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="the ServerApp also logs Flower's own lines (quiet by default)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    start = commands.add_parser("start", help="start the SuperLink and the nginx proxy (foreground; Ctrl-C stops)")
    start.add_argument("--credentials", type=Path, help="the folder written by skin-fl-certs (ca.crt, server.crt/key, sites/*.pub)")
    start.add_argument(
        "--host", help="address nginx listens on for the sites (default 0.0.0.0; with --insecure 127.0.0.1, the only one allowed)"
    )
    start.add_argument("--port", type=int, default=DEFAULT_PUBLIC_PORT, help=f"public port for the sites (default {DEFAULT_PUBLIC_PORT})")
    start.add_argument(
        "--superlink-port",
        type=int,
        default=DEFAULT_SUPERLINK_PORT,
        help=f"loopback port of the SuperLink, never exposed (default {DEFAULT_SUPERLINK_PORT})",
    )
    start.add_argument("--nginx", help="path of the nginx binary (default: nginx on PATH or /usr/sbin/nginx)")
    start.add_argument(
        "--insecure", action="store_true", help="LOCAL DEVELOPMENT ONLY: no TLS, no node authentication"
    )

    submit = commands.add_parser("submit", help="submit a training run from a run-config TOML file")
    submit.add_argument("run_config", type=Path, metavar="RUN_CONFIG.toml", help="flat kebab-case run settings")
    submit.add_argument("--resume", type=Path, metavar="RUN_FOLDER", help="continue this run folder from its last completed round")

    commands.add_parser("status", help="list the runs and their state")
    history = commands.add_parser("history", help="per-round history of a run: metrics and the sites that took part")
    history.add_argument("run", metavar="RUN_ID_OR_FOLDER", help="a run id (from status) or a run folder")
    stop = commands.add_parser("stop", help="stop a run")
    stop.add_argument("run_id", type=int, metavar="RUN_ID")

    sync = commands.add_parser(
        "sync-site-keys",
        help="make the running server accept exactly the site keys in the credentials folder (revokes removed or replaced keys)",
    )
    sync.add_argument("--credentials", type=Path, required=True, help="the credentials folder 'start' was given")

    nginx_config = commands.add_parser(
        "nginx-config", help="print the nginx config for a system nginx (same template as 'start' uses)"
    )
    nginx_config.add_argument("--credentials", type=Path, required=True, help="the credentials folder on the coordinator")
    nginx_config.add_argument("--listen", default=f"0.0.0.0:{DEFAULT_PUBLIC_PORT}", help="nginx listen address")
    nginx_config.add_argument("--superlink", default=f"127.0.0.1:{DEFAULT_SUPERLINK_PORT}", help="the SuperLink's loopback address")
    nginx_config.add_argument("--nginx-dir", type=Path, default=Path("/var/lib/skin-fl/nginx"), help="folder for nginx's pid, logs, temp")
    nginx_config.add_argument(
        "--worker-user", default="www-data www-data", help="'USER GROUP' of nginx's workers (default: Debian's www-data)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of skin-fl-server."""
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # the SuperLink's processes, the ServerApp among them, inherit it
    layout = StateLayout(args.state_dir.expanduser().resolve())
    try:
        if args.command == "start":
            return _start(args, layout)
        if args.command == "submit":
            return _submit(args, layout)
        if args.command == "status":
            return _status(layout)
        if args.command == "history":
            return _history(args.run, layout)
        if args.command == "stop":
            return _stop(args.run_id, layout)
        if args.command == "sync-site-keys":
            return _sync_site_keys(args, layout)
        return _nginx_config(args)
    except SkinFLError as error:
        print(f"skin-fl-server: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("skin-fl-server: interrupted; every process it started was stopped.", file=sys.stderr)
        return 130


def _start(args: argparse.Namespace, layout: StateLayout) -> int:
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    args.host = args.host or (LOOPBACK if args.insecure else "0.0.0.0")
    coordinator = prepare_coordinator(
        layout.root, args.credentials, args.host, args.port, args.superlink_port, args.nginx, args.insecure,
        say=lambda text: print(text, flush=True),
    )
    # A SIGTERM while the processes start must still stop the ones already running.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        coordinator.start()
    except BaseException:
        coordinator.stop()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    scheme = "http" if args.insecure else "https"
    print(
        f"skin-fl server ready: sites connect to {scheme}://{args.host}:{args.port} "
        f"(skin-fl-client --superlink HOST:{args.port}); logs in {layout.logs_dir}; runs in {layout.runs_dir}.\n"
        f"Submit a run with: skin-fl-server --state-dir {layout.root} submit RUN_CONFIG.toml   (Ctrl-C stops the server)",
        flush=True,
    )
    return coordinator.serve()


def _sync_site_keys(args: argparse.Namespace, layout: StateLayout) -> int:
    from coordinator.site_keys import sync_site_keys

    if not layout.state_file.is_file():
        raise ConfigError(f"no server state in {layout.root}; give the --state-dir of the running skin-fl-server start")
    sync_site_keys(layout, check_credentials(args.credentials.expanduser()), say=lambda text: print(text, flush=True))
    return 0


def _interrupt(signal_number, frame) -> None:
    raise KeyboardInterrupt(f"signal {signal_number}")


def _submit(args: argparse.Namespace, layout: StateLayout) -> int:
    ServerState.load(layout)
    app_dir = app_directory()
    overrides, run = read_run_config_file(args.run_config, app_dir)
    if args.resume is not None:
        folder = args.resume.expanduser().resolve()
        if not RunFolder(folder).config.is_file():
            raise ConfigError(
                f"{folder} is not a skin-fl run folder (no config.json); give a folder under {layout.runs_dir} "
                "(see 'skin-fl-server status')."
            )
        overrides = {**overrides, RESUME_KEY: str(folder)}
    with tempfile.TemporaryDirectory(dir=layout.root, prefix=".submit-") as scratch:
        config_file = write_run_config_file(Path(scratch) / "run-config.toml", overrides)
        reply = run_flower_cli(layout, ["run", str(app_dir), CONNECTION_NAME, "--run-config", str(config_file)], timeout=300)
    if not reply.get("success"):
        raise DeploymentError(f"the SuperLink refused the run: {flower_error(reply)}")
    run_id = reply.get("run-id")
    print(
        f"submitted run {run_id}: {run.federation.rounds} rounds of {run.model.name} "
        f"({'resuming ' + str(args.resume) if args.resume else 'new run'}).\n"
        f"Follow it with 'skin-fl-server status' and 'skin-fl-server history {run_id}'."
    )
    return 0


def _status(layout: StateLayout) -> int:
    ServerState.load(layout)
    reply = run_flower_cli(layout, ["list", CONNECTION_NAME])
    if not reply.get("success"):
        raise DeploymentError(f"could not list the runs: {flower_error(reply)}")
    runs = reply.get("runs", [])
    listed = {str(entry.get("run-id")) for entry in runs}
    # The SuperLink knows the runs since this coordinator started; earlier ones live on in their folders.
    earlier = [folder for folder in sorted(layout.runs_dir.glob("*-run-*")) if _run_id_of_folder(folder) not in listed]
    if not runs and not earlier:
        print("no runs yet; submit one with 'skin-fl-server submit RUN_CONFIG.toml'.")
        return 0
    print(f"{'run id':<22} {'status':<20} {'elapsed':<10} {'rounds done':<12} run folder")
    for folder in earlier:
        ended = "earlier: completed" if RunFolder(folder).final_model.is_file() else "earlier: unfinished"
        print(f"{_run_id_of_folder(folder):<22} {ended:<20} {'-':<10} {len(_history_rounds(folder)):<12} {folder}")
    for entry in runs:
        run_id = str(entry.get("run-id"))
        folder = run_folder_for(run_id, layout)
        rounds_done = len(_history_rounds(folder)) if folder else 0
        print(
            f"{run_id:<22} {str(entry.get('status')):<20} {str(entry.get('elapsed')):<10} "
            f"{rounds_done:<12} {folder if folder else '-'}"
        )
    if earlier:
        print("runs marked 'earlier' ran before the coordinator's last start; resume an unfinished one with "
              "'skin-fl-server submit RUN_CONFIG.toml --resume FOLDER'.")
    return 0


def _run_id_of_folder(folder: Path) -> str:
    """The run id in a run folder's name (<date>-run-<id>[-...])."""
    return folder.name.split("-run-", 1)[1].split("-", 1)[0]


def _history(run: str, layout: StateLayout) -> int:
    folder = Path(run).expanduser()
    if not folder.is_dir():
        found = run_folder_for(run, layout) if run.isdigit() else None
        if found is None:
            raise ConfigError(
                f"{run!r} is neither a run folder nor the id of a run with a folder under {layout.runs_dir}; "
                "see 'skin-fl-server status' for run ids and folders."
            )
        folder = found
    rounds = _history_rounds(folder)
    print(f"run folder {folder.resolve()}")
    if not rounds:
        print("no completed round yet.")
        return 0
    print(f"{'round':>5} {'train loss':>10} {'bal. acc':>8} {'train s':>8} {'eval s':>7}  sites (train / evaluate)")
    for entry in rounds:
        train, evaluate = entry.get("train") or {}, entry.get("evaluate") or {}
        print(
            f"{entry['round']:>5} {_number(train.get('train-loss')):>10} {_number(evaluate.get('balanced-accuracy')):>8} "
            f"{_number(entry.get('train_wall_seconds'), 1):>8} {_number(entry.get('evaluate_wall_seconds'), 1):>7}  "
            f"{', '.join(entry.get('train_sites', [])) or '-'} / {', '.join(entry.get('evaluate_sites', [])) or '-'}"
        )
    return 0


def _stop(run_id: int, layout: StateLayout) -> int:
    ServerState.load(layout)
    reply = run_flower_cli(layout, ["stop", str(run_id), CONNECTION_NAME])
    if not reply.get("success"):
        raise DeploymentError(f"could not stop run {run_id}: {flower_error(reply)}; see 'skin-fl-server status' for run ids.")
    print(f"run {run_id} stopped.")
    return 0


def _nginx_config(args: argparse.Namespace) -> int:
    credentials = check_credentials(args.credentials)
    settings = ProxySettings(
        listen=args.listen,
        superlink_address=args.superlink,
        nginx_dir=args.nginx_dir,
        server_cert=credentials.server_cert,
        server_key=credentials.server_key,
        ca_cert=credentials.ca_cert,
        worker_user=args.worker_user,
    )
    print(render_config(settings), end="")
    return 0


def run_folder_for(run_id: str, layout: StateLayout) -> Path | None:
    """The run folder the ServerApp wrote for `run_id` (its name ends in run-<id>), if any."""
    matches = sorted(layout.runs_dir.glob(f"*-run-{run_id}")) + sorted(layout.runs_dir.glob(f"*-run-{run_id}-*"))
    return matches[-1] if matches else None


def _history_rounds(folder: Path | None) -> list[dict]:
    if folder is None:
        return []
    try:
        return RunFolder(folder).history_rounds()
    except ConfigError:
        return []  # a history being written; status shows it on the next call


def _number(value, digits: int = 4) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
