"""skin-fl-rehearse: a whole federation on this machine (TLS, node keys, nginx, start-up kits, demo images), one run, torn down."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.certs import init_credentials, site_file_stem
from coordinator.deployment import StateLayout, descendants, run_flower_cli, stop_pids
from coordinator.startup_kit import KITS_DIR, SITE_CONFIG, write_startup_kits
from server.round_summary import RoundFollower
from server.run_config_file import read_run_config_values, write_run_config_file
from shared.data.demo import write_demo_dataset
from shared.device import cpu_threads_per_process
from shared.errors import SkinFLError
from shared.run_folder import RunFolder
from shared.version import add_version_option

VENV_BIN = Path(sys.executable).parent
REHEARSAL_RUN = {"num-server-rounds": 2, "image-size": 64, "max-steps-per-epoch": 5, "head-refit-steps": 3}
"""The rehearsal's run: the default model and every phase of a real run (training, evaluation, the classification
layer's refit queries), on small images and few steps so that it ends in minutes on a laptop."""


def free_port() -> int:
    """A TCP port nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_environment() -> dict[str, str]:
    """Environment of every process a rehearsal starts: quiet Flower, one OpenMP thread, this Python's scripts first."""
    environment = dict(os.environ)
    environment.update(
        {
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "PATH": os.pathsep.join([str(VENV_BIN), environment.get("PATH", "")]),
        }
    )
    return environment


@dataclass
class Site:
    """One demo hospital: its name, data folder, image cache and torch threads (its share of the machine's CPUs)."""

    name: str
    data_dir: Path
    cache_dir: Path
    threads: int = 1


@dataclass
class LoopbackFederation:
    """A coordinator and its sites on loopback; every process it starts is stopped by `close`."""

    root: Path
    site_names: tuple[str, ...] = ("Alpha Clinic", "beta")
    images_per_site: int = 36
    processes: list[subprocess.Popen] = field(default_factory=list)
    public_port: int = 0
    superlink_port: int = 0
    server: subprocess.Popen | None = None
    sites: list[Site] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.credentials = self.root / "credentials"
        self.state_dir = self.root / "state"
        self.layout = StateLayout(self.state_dir)
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def make_credentials(self) -> None:
        """The CA, server certificate and site keys, from the real credentials tool."""
        init_credentials(self.credentials, ["localhost"], list(self.site_names), days=2)

    def make_site_data(self) -> None:
        """Different small demo datasets per site (different seeds), 64 px, image-folder format."""
        for index, name in enumerate(self.site_names):
            data_dir = self.root / "data" / site_file_stem(name)
            write_demo_dataset(
                data_dir, format="folder", num_images=self.images_per_site, num_sites=1, seed=11 + index,
                min_per_class=2, width=64, height=64,
            )
            threads = cpu_threads_per_process(len(self.site_names))
            self.sites.append(Site(name, data_dir, self.root / "cache" / site_file_stem(name), threads))

    def start_server(self, extra: tuple[str, ...] = (), timeout: float = 90.0) -> None:
        """`skin-fl-server start` on free loopback ports; returns once it is ready and every site's start-up kit names it."""
        self.public_port, self.superlink_port = free_port(), free_port()
        command = [
            sys.executable, "-m", "coordinator.cli", "--state-dir", str(self.state_dir), "start",
            "--credentials", str(self.credentials), "--host", "127.0.0.1",
            "--port", str(self.public_port), "--superlink-port", str(self.superlink_port), *extra,
        ]
        self.server = self._spawn(command, "server.log")
        self.wait_for_output("server.log", "skin-fl server ready", self.server, timeout)
        write_startup_kits(self.credentials, f"localhost:{self.public_port}")

    def start_site_from_kit(self, site: Site) -> subprocess.Popen:
        """`skin-fl-client --config kits/<site>/site.toml --data ...`, as the site's IT starts it from its start-up kit."""
        stem = site_file_stem(site.name)
        command = [
            sys.executable, "-m", "client.cli", "--config", str(self.credentials / KITS_DIR / stem / SITE_CONFIG),
            "--data", str(site.data_dir), "--format", "folder", "--cache-dir", str(site.cache_dir),
            "--state-dir", str(self.root / "client-state" / stem), "--supernode-port", str(free_port()),
            "--sites-on-host", str(len(self.site_names)),
        ]
        return self._spawn(command, f"client-{stem}.log")

    def server_cli(self, *arguments: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
        """Run `skin-fl-server --state-dir STATE ARGUMENTS` and capture its output."""
        return subprocess.run(
            [sys.executable, "-m", "coordinator.cli", "--state-dir", str(self.state_dir), *arguments],
            capture_output=True, text=True, timeout=timeout, env=process_environment(), cwd=self.root,
        )

    def submit(self, run_config: dict, *extra: str) -> str:
        """Submit a run with these run-config values; returns its run id."""
        config_file = write_run_config_file(self.root / f"run-config-{time.monotonic_ns()}.toml", run_config)
        result = self.server_cli("submit", str(config_file), *extra)
        if result.returncode != 0:
            raise RehearsalFailed(f"submit failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout.split("submitted run ", 1)[1].split(":", 1)[0].strip()

    def run_status(self, run_id: str) -> str:
        """Flower's status text of a run (pending, starting, running, finished:completed, ...)."""
        reply = run_flower_cli(self.layout, ["list", "--run-id", run_id])
        runs = reply.get("runs") or []
        return runs[0]["status"] if runs else "unknown"

    def wait_for_run(self, run_id: str, timeout: float, follow: Callable[[str], None] | None = None) -> str:
        """Wait until the run finishes; returns Flower's final status text.

        The run folder's final model marks the end cheaply; Flower's own status (a CLI process) is asked
        only every few seconds, to notice a failed run. `follow` receives each round's summary line as it ends.
        """
        follower = RoundFollower(self.layout.runs_dir) if follow is not None else None

        def report_new_rounds() -> None:
            for line in follower.new_lines() if follower is not None else ():
                follow(line)

        deadline = time.monotonic() + timeout
        status, next_status_check = "unknown", time.monotonic() + 15.0
        while time.monotonic() < deadline:
            report_new_rounds()
            finished_folder = any(self.layout.runs_dir.glob(f"*-run-{run_id}/final_model.pt"))
            if finished_folder or time.monotonic() >= next_status_check:
                status = self.run_status(run_id)
                if status.startswith("finished"):
                    report_new_rounds()
                    return status
                next_status_check = time.monotonic() + 15.0
            time.sleep(0.5)
        raise RehearsalFailed(f"run {run_id} still {status!r} after {timeout:.0f} s\n{self.log_tails()}")

    def run_folder(self, run_id: str) -> Path:
        """The run folder the ServerApp wrote for `run_id`."""
        matches = sorted(self.layout.runs_dir.glob(f"*-run-{run_id}"))
        if len(matches) != 1:
            raise RehearsalFailed(f"expected one run folder for run {run_id}, found {matches}\n{self.log_tails()}")
        return matches[0]

    def wait_for_output(self, log_name: str, text: str, process: subprocess.Popen, timeout: float) -> str:
        """Block until `text` appears in a process log; fails with the log when the process exits first."""
        deadline = time.monotonic() + timeout
        path = self.logs / log_name
        while time.monotonic() < deadline:
            content = path.read_text(errors="replace") if path.exists() else ""
            if text in content:
                return content
            if process.poll() is not None:
                raise RehearsalFailed(f"{log_name}: process exited ({process.returncode}) before {text!r}:\n{content[-4000:]}")
            time.sleep(0.2)
        raise RehearsalFailed(f"{log_name}: no {text!r} within {timeout:.0f} s:\n{path.read_text(errors='replace')[-4000:]}")

    def log(self, log_name: str) -> str:
        """The text a started process wrote so far."""
        path = self.logs / log_name
        return path.read_text(errors="replace") if path.exists() else ""

    def log_tails(self, lines: int = 30) -> str:
        """The last lines of every log, for failure messages."""
        parts = []
        for path in sorted(self.logs.glob("*.log")) + sorted(self.layout.logs_dir.glob("*.log")):
            tail = "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            parts.append(f"--- {path.name}\n{tail}")
        return "\n".join(parts)

    def close(self) -> None:
        """Stop every started process and anything they started: SIGTERM to all at once, then SIGKILL."""
        running = [process for process in self.processes if process.poll() is None]
        below = [pid for process in running for pid in descendants(process.pid)]
        for process in running:
            process.terminate()
        # The server stops nginx and the SuperLink itself; site clients stop their SuperNode and its runner.
        deadline = time.monotonic() + 30
        for process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        stop_pids(below)

    def __enter__(self) -> LoopbackFederation:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _spawn(self, command: list[str], log_name: str, environment: dict[str, str] | None = None) -> subprocess.Popen:
        with (self.logs / log_name).open("ab") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**process_environment(), **(environment or {})}, cwd=self.root,
            )
        self.processes.append(process)
        return process


class RehearsalFailed(SkinFLError):
    """A step of the rehearsal did not happen; the message holds the logs that say why."""


def rehearse(folder: Path, sites: int, run_config: dict, timeout: float, say=print) -> Path:
    """Run the whole rehearsal in `folder`; returns the finished run's folder (raises RehearsalFailed)."""
    names = tuple(f"Hospital {chr(ord('A') + index)}" for index in range(sites))
    started = time.monotonic()
    with LoopbackFederation(folder, site_names=names, images_per_site=200) as federation:
        say(f"credentials: a CA, the server certificate for localhost and {_count(sites, 'site key')} in {federation.credentials}")
        federation.make_credentials()
        federation.make_site_data()
        say(f"data: {federation.images_per_site} generated images per site (no patient data) in {folder / 'data'}")
        federation.start_server()
        say(f"server: nginx on 127.0.0.1:{federation.public_port} (TLS 1.3, node keys), SuperLink on loopback")
        clients = [federation.start_site_from_kit(site) for site in federation.sites]
        for site, client in zip(federation.sites, clients):
            federation.wait_for_output(f"client-{site_file_stem(site.name)}.log", "is connected", client, 120)
        say(f"sites: {', '.join(names)} started from their start-up kits ({federation.credentials / KITS_DIR}) and connected")
        run_id = federation.submit(run_config)
        say(f"run {run_id} of {_count(run_config['num-server-rounds'], 'round')} submitted; waiting (up to {timeout:.0f} s)")
        status = federation.wait_for_run(run_id, timeout, follow=say)
        if status != "finished:completed":
            raise RehearsalFailed(f"run {run_id} ended {status!r}\n{federation.log_tails()}")
        run_folder = federation.run_folder(run_id)
        answered = {site for entry in RunFolder(run_folder).history_rounds() for site in entry.get("evaluate_sites", [])}
        if answered != set(names) or not RunFolder(run_folder).final_model.is_file():
            raise RehearsalFailed(f"run {run_id} finished without every site's evaluation or a final model\n{federation.log_tails()}")
    say(f"rehearsal passed in {time.monotonic() - started:.0f} s: every process stopped")
    return run_folder


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of skin-fl-rehearse."""
    parser = argparse.ArgumentParser(
        prog="skin-fl-rehearse",
        description="Rehearse a federation on this machine before touching real data: credentials and start-up kits, "
        "skin-fl-server (nginx, TLS, node authentication), one skin-fl-client per site on generated images, one run "
        "with the default model, then everything stopped. Needs nginx, as skin-fl-server does.",
    )
    add_version_option(parser)
    parser.add_argument("--sites", type=int, default=2, help="number of hospital sites (default 2)")
    parser.add_argument(
        "--run-config", type=Path, metavar="RUN.toml",
        help="run-config values laid over the rehearsal's (2 rounds, 64 px, 5 steps per epoch, 3 refit queries)",
    )
    parser.add_argument("--workdir", type=Path, help="folder to rehearse in (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the folder (logs, run folder, kits) after a pass")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds the run may take (default 1800)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of skin-fl-rehearse."""
    args = build_parser().parse_args(argv)
    if not 1 <= args.sites <= 26:
        print("skin-fl-rehearse: error: --sites takes 1 to 26 sites", file=sys.stderr)
        return 2
    folder = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="skin-fl-rehearsal-"))
    if args.workdir and folder.exists() and any(folder.iterdir()):
        print(f"skin-fl-rehearse: error: {folder} is not empty; give a new or empty --workdir", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        overrides = read_run_config_values(args.run_config) if args.run_config else {}
        run_config = {**REHEARSAL_RUN, "min-sites": args.sites, **overrides}
        rehearse(folder, args.sites, run_config, args.timeout, say=lambda text: print(f"skin-fl-rehearse: {text}", flush=True))
    except SkinFLError as error:
        print(f"skin-fl-rehearse: FAILED: {error}", file=sys.stderr)
        print(f"skin-fl-rehearse: logs and state kept in {folder}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"skin-fl-rehearse: interrupted; every process stopped, the folder is kept: {folder}", file=sys.stderr)
        return 130
    if args.keep or args.workdir:
        print(f"skin-fl-rehearse: folder kept: {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _interrupt(signal_number: int, frame) -> None:
    # SIGTERM (a service manager, a test's timeout) tears the federation down as Ctrl-C does.
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
