"""`skin-fl-client`: check a hospital site's setup, then run its Flower SuperNode and keep it connected."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from client.site_config import (
    SiteSettings,
    build_site_settings,
    check_ca_certificate,
    check_site_key,
    node_config_toml,
    read_site_file,
    resolve_state_dir,
)
from client.supernode_output import ConnectionContext, Diagnosis, OutputWatcher
from shared.errors import ConfigError, SkinFLError
from shared.network import parse_server_address
from shared.version import add_version_option

NODE_CONFIG_FILE = "node-config.toml"
SUPERNODE_LOG = "supernode.log"
EXIT_LINGER_S = 1.5
KILL_AFTER_S = 20.0
CONNECTED_RESETS_BACKOFF_S = 120.0
"""A SuperNode that stayed connected this long counts as healthy: the next restart waits the first pause again."""
EXIT_BAD_SETUP = 2
EXIT_CANNOT_JOIN = 3
EXIT_GAVE_UP = 4


def _key_release_s() -> float:
    # The SuperLink keeps a vanished node 'online' for HEARTBEAT_PATIENCE heartbeat intervals and
    # refuses a second activation with the same key until then.
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

    return HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL + 30.0


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of skin-fl-client."""
    parser = argparse.ArgumentParser(
        prog="skin-fl-client",
        description="Join the skin-fl federation for one hospital site: check the site's data, CA certificate, "
        "key and server address, then run the Flower SuperNode, reconnecting when the connection drops. "
        "Settings come from a site config file (--config) and/or the options below (options win).",
    )
    add_version_option(parser)
    parser.add_argument("--config", type=Path, metavar="SITE.toml", help="site config file (see deploy/sites/example-site.toml)")
    parser.add_argument("--site", help="the site's name as the coordinator registered it (quote names with spaces)")
    parser.add_argument("--superlink", metavar="HOST:PORT", help="the federation server's public address")
    parser.add_argument("--ca-cert", type=Path, help="the federation's CA certificate (ca.crt)")
    parser.add_argument("--site-key", type=Path, help="this site's node private key (sites/<site>.key)")
    parser.add_argument("--data", type=Path, help="the site's dataset folder")
    parser.add_argument("--format", choices=["ham10000", "isic2019", "isic2020", "folder"], help="dataset format (recognised when omitted)")
    parser.add_argument("--skip-bad", action="store_true", default=None, help="leave out unreadable images and unknown labels")
    parser.add_argument("--cache-dir", type=Path, help="decoded-image cache folder")
    parser.add_argument("--feedback-store", type=Path, help="the clinician web app's cases.sqlite to train on")
    parser.add_argument("--supernode-port", type=int, help="local port of the SuperNode's runtime API (default 9094; one per site on a machine)")
    parser.add_argument("--state-dir", type=Path, help="where the node config and SuperNode log are kept")
    parser.add_argument(
        "--threads", type=_thread_count, metavar="N|auto",
        help="torch CPU threads of the site's training (default auto: the machine's CPUs divided by --sites-on-host)",
    )
    parser.add_argument(
        "--sites-on-host", type=int, metavar="N", help="skin-fl sites sharing this machine (default 1); auto threads share the CPUs out"
    )
    parser.add_argument("--max-restarts", type=int, help="give up after this many failed restarts in a row (default: never)")
    parser.add_argument("--insecure", action="store_true", default=None, help="LOCAL DEVELOPMENT ONLY: no TLS, no site key")
    parser.add_argument("--check", action="store_true", help="only run the local checks, print the summary and exit")
    return parser


def _thread_count(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a thread count; give a positive number or auto") from None


def settings_from_args(args: argparse.Namespace) -> SiteSettings:
    """The validated site settings: the config file's values with the command-line options on top."""
    file_values = read_site_file(args.config) if args.config is not None else {}
    overrides = {
        "site": args.site,
        "superlink": args.superlink,
        "ca-cert": str(args.ca_cert) if args.ca_cert else None,
        "site-key": str(args.site_key) if args.site_key else None,
        "insecure": args.insecure,
        "supernode-port": args.supernode_port,
        "state-dir": str(args.state_dir) if args.state_dir else None,
        "threads": args.threads,
        "sites-on-host": args.sites_on_host,
        "data.dir": str(args.data) if args.data else None,
        "data.format": args.format,
        "data.skip-bad": args.skip_bad,
        "data.cache-dir": str(args.cache_dir) if args.cache_dir else None,
        "data.feedback-store": str(args.feedback_store) if args.feedback_store else None,
    }
    settings = build_site_settings(file_values, overrides, str(args.config) if args.config else "the command line")
    if args.max_restarts is not None:
        settings.reconnect.max_restarts = args.max_restarts
    return settings


@dataclass
class CheckedSite:
    """A site whose setup passed every local check: settings, data format and image counts."""

    settings: SiteSettings
    data_format: str
    num_images: int
    class_counts: dict[str, int]
    skipped: int


def check_site(settings: SiteSettings) -> CheckedSite:
    """Every local check before connecting; raises a ConfigError/DataError that says what to fix."""
    from shared.data.readers import detect_format, read_dataset

    parse_server_address(settings.superlink)
    if not settings.insecure:
        check_ca_certificate(settings.ca_cert)
        check_site_key(settings.site_key, settings.site)
    data_dir = Path(settings.data.dir).expanduser()
    data_format = settings.data.format or detect_format(data_dir)
    table = read_dataset(data_dir, data_format, skip_bad=settings.data.skip_bad)
    if len(table) == 0:
        raise ConfigError(f"{data_dir} holds no labelled image in the {data_format} layout; point --data at the site's dataset folder.")
    if settings.data.feedback_store is not None and not Path(settings.data.feedback_store).expanduser().is_file():
        raise ConfigError(
            f"feedback store {settings.data.feedback_store} does not exist; give the cases.sqlite of the site's "
            "skin-fl-web, or leave feedback-store out."
        )
    return CheckedSite(settings, data_format, len(table), table.class_counts(), len(table.skipped))


def describe_checked_site(checked: CheckedSite) -> str:
    """The summary printed after the checks: no file names, only counts."""
    settings = checked.settings
    counts = ", ".join(f"{name} {count}" for name, count in checked.class_counts.items())
    security = "NO TLS, NO site key (--insecure)" if settings.insecure else f"TLS with CA {settings.ca_cert}, site key {settings.site_key}"
    lines = [
        f"site {settings.site!r}: {checked.num_images} labelled images ({checked.data_format}): {counts}",
        f"server {settings.superlink}; {security}",
    ]
    if checked.skipped:
        lines.append(f"{checked.skipped} unreadable or unlabelled images left out (skip-bad)")
    return "\n".join(lines)


def supernode_command(settings: SiteSettings, node_config_path: Path) -> list[str]:
    """The command line that runs this site's flower-supernode under the site's own ClientApp runner.

    The runner (`client.task_runner`) loads the site's code once and forks a worker per task, so a
    message costs no process start-up, and the site runs only its installed code: the
    coordinator's app package is checked against it, never installed.
    """
    from client.task_runner import runner_command
    from shared.executables import venv_executable

    command = [venv_executable("flower-supernode"), "--superlink", settings.superlink]
    if settings.insecure:
        command += ["--insecure"]
    else:
        command += [
            "--root-certificates", str(Path(settings.ca_cert).expanduser().resolve()),
            "--auth-supernode-private-key", str(Path(settings.site_key).expanduser().resolve()),
        ]
    command += [
        # A path ending in .toml is read as a TOML file by flwr, so names with spaces or quotes survive intact.
        "--node-config", str(node_config_path),
        "--port", str(settings.supernode_port),
        "--max-wait-time", str(settings.reconnect.supernode_wait_s),
    ]
    return runner_command(command, settings.supernode_port)


def supernode_environment(state_dir: Path) -> dict[str, str]:
    """Quiet Flower, this environment's scripts first on PATH (the runner starts flower-supernode from it)."""
    environment = dict(os.environ)
    environment.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"})
    environment.setdefault("FLWR_HOME", str(state_dir / "flwr-home"))
    environment["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environment.get("PATH", "")])
    return environment


class SupernodeSupervisor:
    """Runs the SuperNode, explains its problems, and restarts it with growing pauses when retrying helps."""

    def __init__(self, settings: SiteSettings, command: list[str], environment: dict[str, str], log_path: Path,
                 say: Callable[[str], None] = print):
        self.settings = settings
        self.command = command
        self.environment = environment
        self.log_path = log_path
        self.say = say
        self.context = ConnectionContext(settings.site, settings.superlink, settings.ca_cert, settings.site_key)
        self.process: subprocess.Popen | None = None
        self._stop = threading.Event()

    def request_stop(self, *_ignored) -> None:
        """Stop the SuperNode (gracefully, so the server frees the site's key at once) and do not restart."""
        self._stop.set()
        self._terminate()

    def _terminate(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            self._signal_group(process, signal.SIGTERM)
            escalate = threading.Timer(KILL_AFTER_S, lambda: process.poll() is None and self._signal_group(process, signal.SIGKILL))
            escalate.daemon = True
            escalate.start()

    @staticmethod
    def _signal_group(process: subprocess.Popen, number: int) -> None:
        try:
            os.killpg(process.pid, number)
        except ProcessLookupError:
            pass

    def run_once(self) -> tuple[int, OutputWatcher, float]:
        """Start the SuperNode and relay its output until it exits: (exit code, what it said, seconds connected)."""
        watcher = OutputWatcher(self.context)
        connected_at = None
        exit_timer: threading.Timer | None = None
        with self.log_path.open("a", encoding="utf-8") as log:
            # Its own session, so stopping it also stops the ClientApp processes it started.
            self.process = subprocess.Popen(
                self.command, env=self.environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, text=True, errors="replace", start_new_session=True,
            )
            assert self.process.stdout is not None
            if self._stop.is_set():  # a stop that arrived while the SuperNode was being started
                self._terminate()
            for line in self.process.stdout:
                log.write(line)
                log.flush()
                sys.stdout.write(line)
                diagnosis = watcher.feed(line)
                if "Exit Code:" in line and exit_timer is None:
                    # The SuperNode has given up: end it, the runner and any task worker once its last
                    # words are out.
                    exit_timer = threading.Timer(EXIT_LINGER_S, self._terminate)
                    exit_timer.start()
                if "SuperNode ID:" in line and connected_at is None:
                    connected_at = time.monotonic()
                    self.say(f"skin-fl-client: site {self.settings.site!r} is connected to {self.settings.superlink}.")
                if diagnosis is not None and diagnosis.kind != "gave-up":
                    self.say(f"skin-fl-client: {diagnosis.message}")
            code = self.process.wait()
            if exit_timer is not None:
                exit_timer.cancel()
        return code, watcher, (time.monotonic() - connected_at) if connected_at is not None else 0.0

    def run(self) -> int:
        """Keep the SuperNode running until stopped, a problem retrying cannot fix, or max_restarts."""
        reconnect = self.settings.reconnect
        pause = reconnect.first_backoff_s
        failed_restarts = 0
        key_refused_since: float | None = None
        while not self._stop.is_set():
            code, watcher, connected_seconds = self.run_once()
            if self._stop.is_set():
                self.say("skin-fl-client: stopped.")
                return 0
            diagnosis = watcher.diagnosis() or Diagnosis(
                "exited", f"the SuperNode exited with code {code}; its output is in {self.log_path}", True
            )
            if not diagnosis.retry_helps:
                self.say(f"skin-fl-client: cannot join the federation: {diagnosis.message}")
                return EXIT_CANNOT_JOIN
            if diagnosis.kind == "key-refused":
                key_refused_since = key_refused_since or time.monotonic()
                if time.monotonic() - key_refused_since > _key_release_s():
                    self.say(
                        f"skin-fl-client: cannot join the federation: the key was still refused after "
                        f"{_key_release_s():.0f} s, so it is not registered or another SuperNode uses it: {diagnosis.message}"
                    )
                    return EXIT_CANNOT_JOIN
            else:
                key_refused_since = None
            if connected_seconds >= CONNECTED_RESETS_BACKOFF_S:
                pause, failed_restarts = reconnect.first_backoff_s, 0
            failed_restarts += 1
            if reconnect.max_restarts and failed_restarts > reconnect.max_restarts:
                self.say(f"skin-fl-client: giving up after {reconnect.max_restarts} restarts: {diagnosis.message}")
                return EXIT_GAVE_UP
            self.say(f"skin-fl-client: restarting the SuperNode in {pause:.0f} s (restart {failed_restarts}).")
            if self._stop.wait(pause):
                break
            pause = min(pause * 2, reconnect.max_backoff_s)
        self.say("skin-fl-client: stopped.")
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of skin-fl-client."""
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        checked = check_site(settings)
    except SkinFLError as error:
        print(f"skin-fl-client: error: {error}", file=sys.stderr)
        return EXIT_BAD_SETUP
    print(describe_checked_site(checked), flush=True)
    if settings.insecure:
        print("skin-fl-client: WARNING: --insecure sends weights unencrypted and without a site key; development only.",
              file=sys.stderr, flush=True)
    if args.check:
        print("all local checks passed.")
        return 0
    state_dir = resolve_state_dir(settings)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    node_config_path = state_dir / NODE_CONFIG_FILE
    node_config_path.write_text(node_config_toml(settings, checked.data_format), encoding="utf-8")
    supervisor = SupernodeSupervisor(
        settings,
        supernode_command(settings, node_config_path),
        supernode_environment(state_dir),
        state_dir / SUPERNODE_LOG,
        say=lambda text: print(text, flush=True),
    )
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, supervisor.request_stop)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
