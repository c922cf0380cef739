"""Real-process deployment on loopback for tests: credentials, skin-fl-server (nginx + SuperLink), SuperNodes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from client.task_runner import runner_command
from server.certs import init_credentials, site_file_stem
from server.deployment import StateLayout, descendants, run_flower_cli, stop_pids
from server.run_config_file import write_run_config_file
from shared.data.demo import write_demo_dataset
from shared.device import cpu_threads_per_process
from shared.protocol import FLOWER_OBJECT_TRANSFER_ENV

VENV_BIN = Path(sys.executable).parent
FAST_RUN_CONFIG = {
    "num-server-rounds": 2,
    "model": "test_resnet",
    "pretrained": "none",
    "image-size": 64,
    "batch-size": 8,
    "max-steps-per-epoch": 2,
    "amp": "off",
    "head-refit-steps": 0,
}
"""A run that exercises every part of a round in seconds: timm's 0.4M-parameter test ResNet (a message's weights
are 1.5 MB: moving resnet18's 45 MB through the SuperLink and nginx was most of a test round), tiny images,
random init, two steps per epoch (and no refit of the classification layer, whose queries the TLS run proves)."""


def free_port() -> int:
    """A TCP port nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_environment() -> dict[str, str]:
    """Environment of every process the harness starts: quiet Flower, one thread, this venv first."""
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

    @property
    def node_config(self) -> str:
        """The SuperNode's --node-config string (names with spaces stay one value), as skin-fl-client writes it."""
        return f'site="{self.name}" data-dir="{self.data_dir}" format="folder" cache-dir="{self.cache_dir}" threads={self.threads}'


@dataclass
class Deployment:
    """A coordinator and its sites on loopback; every process it starts is stopped by `close`."""

    root: Path
    site_names: tuple[str, ...] = ("Alpha Clinic", "beta")
    images_per_site: int = 36
    processes: list[subprocess.Popen] = field(default_factory=list)
    public_port: int = 0
    superlink_port: int = 0
    server: subprocess.Popen | None = None
    sites: list[Site] = field(default_factory=list)
    task_runner: bool = True
    """SuperNodes run under skin-fl's task runner, as skin-fl-client starts them; False: Flower's own per-message processes."""

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
        """`skin-fl-server start` on free loopback ports; returns once it says it is ready."""
        self.public_port, self.superlink_port = free_port(), free_port()
        command = [
            sys.executable, "-m", "server.cli", "--state-dir", str(self.state_dir), "start",
            "--credentials", str(self.credentials), "--host", "127.0.0.1",
            "--port", str(self.public_port), "--superlink-port", str(self.superlink_port), *extra,
        ]
        self.server = self._spawn(command, "server.log")
        self.wait_for_output("server.log", "skin-fl server ready", self.server, timeout)

    def start_supernode(
        self, site: Site, *, key: Path | None = None, ca: Path | None = None, log_name: str | None = None,
        extra: tuple[str, ...] = (),
    ) -> subprocess.Popen:
        """A real flower-supernode for `site` connecting through nginx's public port, under the site's task runner."""
        key = key if key is not None else self.credentials / "sites" / f"{site_file_stem(site.name)}.key"
        runtime_port = free_port()
        command = [
            str(VENV_BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.public_port}",
            "--auth-supernode-private-key", str(key), "--node-config", site.node_config,
            "--port", str(runtime_port), *extra,
        ]
        if ca is not None:
            command += ["--root-certificates", str(ca)]
        if self.task_runner:
            command = runner_command(command, runtime_port)
        # Each SuperNode installs the app it is sent into its own FLWR_HOME, not the user's ~/.flwr.
        flwr_home = self.root / "site-flwr-home" / site_file_stem(site.name)
        # Flower's own runner gets the same object transfer settings as skin-fl's (which sets them itself).
        environment = {"FLWR_HOME": str(flwr_home), **FLOWER_OBJECT_TRANSFER_ENV}
        return self._spawn(command, log_name or f"supernode-{site_file_stem(site.name)}.log", environment)

    def server_cli(self, *arguments: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
        """Run `skin-fl-server --state-dir STATE ARGUMENTS` and capture its output."""
        return subprocess.run(
            [sys.executable, "-m", "server.cli", "--state-dir", str(self.state_dir), *arguments],
            capture_output=True, text=True, timeout=timeout, env=process_environment(), cwd=self.root,
        )

    def submit(self, run_config: dict, *extra: str) -> str:
        """Submit a run with these run-config values; returns its run id."""
        config_file = write_run_config_file(self.root / f"run-config-{time.monotonic_ns()}.toml", run_config)
        result = self.server_cli("submit", str(config_file), *extra)
        if result.returncode != 0:
            raise AssertionError(f"submit failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout.split("submitted run ", 1)[1].split(":", 1)[0].strip()

    def run_status(self, run_id: str) -> str:
        """Flower's status text of a run (pending, starting, running, finished:completed, ...)."""
        reply = run_flower_cli(self.layout, ["list", "--run-id", run_id])
        runs = reply.get("runs") or []
        return runs[0]["status"] if runs else "unknown"

    def wait_for_run(self, run_id: str, timeout: float) -> str:
        """Wait until the run finishes; returns Flower's final status text.

        The run folder's final model marks the end cheaply; Flower's own status (a CLI process) is asked
        only every few seconds, to notice a failed run.
        """
        deadline = time.monotonic() + timeout
        status, next_status_check = "unknown", time.monotonic() + 15.0
        while time.monotonic() < deadline:
            finished_folder = any(self.layout.runs_dir.glob(f"*-run-{run_id}/final_model.pt"))
            if finished_folder or time.monotonic() >= next_status_check:
                status = self.run_status(run_id)
                if status.startswith("finished"):
                    return status
                next_status_check = time.monotonic() + 15.0
            time.sleep(0.5)
        raise AssertionError(f"run {run_id} still {status!r} after {timeout:.0f} s\n{self.log_tails()}")

    def run_folder(self, run_id: str) -> Path:
        """The run folder the ServerApp wrote for `run_id`."""
        matches = sorted(self.layout.runs_dir.glob(f"*-run-{run_id}"))
        if len(matches) != 1:
            raise AssertionError(f"expected one run folder for run {run_id}, found {matches}\n{self.log_tails()}")
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
                raise AssertionError(f"{log_name}: process exited ({process.returncode}) before {text!r}:\n{content[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"{log_name}: no {text!r} within {timeout:.0f} s:\n{path.read_text(errors='replace')[-4000:]}")

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
        # The server stops nginx and the SuperLink itself; SuperNodes stop their ClientApp processes.
        deadline = time.monotonic() + 30
        for process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        stop_pids(below)

    def __enter__(self) -> Deployment:
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


def read_json(path: Path) -> dict:
    """A JSON file's content."""
    return json.loads(Path(path).read_text())
