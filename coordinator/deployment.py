"""The coordinator's deployment: SuperLink on loopback, nginx on the public port, site keys registered."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509

from coordinator.certs import CA_CERT, SERVER_CERT, SERVER_KEY, SITES_DIR, registered_sites
from coordinator.nginx_proxy import ProxySettings, find_nginx, nginx_command, write_config
from server.round_summary import RoundFollower
from shared.errors import ConfigError, SkinFLError
from shared.executables import venv_executable
from shared.network import is_loopback
from shared.protocol import FLOWER_OBJECT_TRANSFER_ENV

LOOPBACK = "127.0.0.1"
CONNECTION_NAME = "skin-fl"
"""The SuperLink connection name written into the Flower CLI's config.toml."""
STATE_FILE = "server.json"
SITE_KEYS_FILE = "site_keys.json"
STARTUP_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0
FLOWER_QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


class DeploymentError(SkinFLError):
    """A deployment process could not start or stopped unexpectedly; the message says what to do."""


@dataclass(frozen=True)
class StateLayout:
    """Where the coordinator keeps its state: run folders, site-key record, logs, nginx and CLI config."""

    root: Path

    @property
    def runs_dir(self) -> Path:
        """SKIN_FL_RUNS_DIR of the ServerApp: one folder per run."""
        return self.root / "runs"

    @property
    def flwr_home(self) -> Path:
        """FLWR_HOME of the Flower CLI calls (its config.toml names the loopback SuperLink)."""
        return self.root / "flwr-home"

    @property
    def nginx_dir(self) -> Path:
        """nginx's prefix: rendered config, pid file, logs and temp folders."""
        return self.root / "nginx"

    @property
    def logs_dir(self) -> Path:
        """Log files of the SuperLink (and its ServerApp processes)."""
        return self.root / "logs"

    @property
    def site_keys_file(self) -> Path:
        """The node id and key fingerprint of every site key this coordinator registered (coordinator.site_keys)."""
        return self.root / SITE_KEYS_FILE

    @property
    def state_file(self) -> Path:
        """What `start` wrote for the other subcommands: ports, TLS mode, credential paths."""
        return self.root / STATE_FILE


@dataclass(frozen=True)
class Credentials:
    """The credential files the coordinator uses, checked to exist and be usable."""

    folder: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    site_keys: tuple[tuple[str, Path], ...]


@dataclass(frozen=True)
class ServerState:
    """What a running (or last) `skin-fl-server start` recorded in the state folder."""

    superlink_port: int
    public_host: str
    public_port: int
    insecure: bool
    ca_cert: str | None
    pid: int

    @classmethod
    def load(cls, layout: StateLayout) -> ServerState:
        """Read the state file, or explain how to create it."""
        if not layout.state_file.is_file():
            raise ConfigError(
                f"no skin-fl server state in {layout.root}; start the server first with "
                f"'skin-fl-server start --state-dir {layout.root} ...', or pass the --state-dir it uses."
            )
        return cls(**json.loads(layout.state_file.read_text(encoding="utf-8")))


def check_credentials(folder: Path) -> Credentials:
    """The CA, server certificate and key, and site public keys in `folder`, or an error naming the fix."""
    folder = Path(folder).expanduser().resolve()
    create_hint = (
        f"create them with 'skin-fl-certs init --out {folder} --server-name HOST --site NAME' "
        "(repeat --site for each hospital), or pass --credentials with the folder skin-fl-certs wrote."
    )
    if not folder.is_dir():
        raise ConfigError(f"credentials folder {folder} does not exist; {create_hint}")
    missing = [name for name in (CA_CERT, SERVER_CERT, SERVER_KEY) if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"{folder} lacks {', '.join(missing)}; {create_hint}")
    key_mode = (folder / SERVER_KEY).stat().st_mode
    if key_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{folder / SERVER_KEY} can be read by other users (mode {stat.S_IMODE(key_mode):o}); "
            f"make it private with 'chmod 600 {folder / SERVER_KEY}'."
        )
    try:
        certificate = x509.load_pem_x509_certificate((folder / SERVER_CERT).read_bytes())
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound) as error:
        raise ConfigError(f"{folder / SERVER_CERT} is not a certificate made by skin-fl-certs ({error}); {create_hint}") from error
    if "localhost" not in names.get_values_for_type(x509.DNSName):
        raise ConfigError(
            f"{folder / SERVER_CERT} does not name localhost, which the proxy and Flower's own loopback calls need; "
            f"issue new credentials with skin-fl-certs (it always adds localhost and 127.0.0.1). {create_hint}"
        )
    sites = tuple((site, folder / SITES_DIR / f"{stem}.pub") for site, stem in registered_sites(folder))
    if not sites:
        raise ConfigError(
            f"{folder / SITES_DIR} holds no site public key (*.pub); add each hospital with "
            f"'skin-fl-certs add-site --out {folder} --site NAME'."
        )
    return Credentials(folder, folder / CA_CERT, folder / SERVER_CERT, folder / SERVER_KEY, sites)


def ensure_port_free(host: str, port: int, what: str, option: str) -> None:
    """Raise a clear error when `host:port` cannot be bound (another program holds it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As uvicorn and nginx do: a port left in TIME_WAIT by a previous run is free to use.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ConfigError(
                f"port {port} on {host} ({what}) is not available: {error.strerror}. Stop the program using it "
                f"(see 'ss -ltnp | grep :{port}') or choose another port with {option}."
            ) from error


def flower_environment(layout: StateLayout) -> dict[str, str]:
    """Environment of every Flower process: quiet, no dependency installs, 8 objects at a time, this venv first on PATH."""
    environment = dict(os.environ)
    environment.update(FLOWER_QUIET_ENV)
    environment.update(FLOWER_OBJECT_TRANSFER_ENV)
    environment["FLWR_HOME"] = str(layout.flwr_home)
    environment["SKIN_FL_RUNS_DIR"] = str(layout.runs_dir)
    # SuperExec starts flwr-serverapp by name: it must find this environment's scripts.
    environment["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environment.get("PATH", "")])
    return environment


def write_flower_cli_config(layout: StateLayout, superlink_port: int, ca_cert: Path | None) -> Path:
    """The Flower CLI's config.toml: one connection, to the SuperLink on loopback."""
    layout.flwr_home.mkdir(mode=0o700, parents=True, exist_ok=True)
    lines = [
        "[superlink]",
        f'default = "{CONNECTION_NAME}"',
        "",
        f"[superlink.{CONNECTION_NAME}]",
        f'address = "{LOOPBACK}:{superlink_port}"',
    ]
    lines.append(f"root-certificates = {json.dumps(str(ca_cert))}" if ca_cert is not None else "insecure = true")
    path = layout.flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_flower_cli(layout: StateLayout, arguments: Sequence[str], timeout: float = 120.0) -> dict:
    """Run `flwr ARGUMENTS --format json` against the loopback SuperLink; returns its JSON reply."""
    command = [venv_executable("flwr"), *arguments, "--format", "json"]
    completed = subprocess.run(
        command, env=flower_environment(layout), capture_output=True, text=True, timeout=timeout, check=False
    )
    text = completed.stdout.strip()
    start = text.find("{")
    try:
        reply = json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        reply = None
    if not isinstance(reply, dict):
        raise DeploymentError(
            f"'flwr {' '.join(arguments)}' gave no answer (exit {completed.returncode}): "
            f"{(completed.stdout + completed.stderr).strip()[-1500:]}"
        )
    return reply


def flower_error(reply: dict) -> str:
    """The error text of a failed Flower CLI JSON reply, without its connection banner."""
    message = str(reply.get("error-message", "unknown error"))
    return message.split("\n\n", 1)[-1].strip()


def wait_for_superlink(port: int, ca_cert: Path | None, process: subprocess.Popen, log_path: Path) -> None:
    """Block until the SuperLink answers /health on loopback, or raise with its log's last lines."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    context = None
    if ca_cert is not None:
        context = ssl.create_default_context(cafile=str(ca_cert))
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DeploymentError(f"the SuperLink exited with code {process.returncode} while starting:\n{log_tail(log_path)}")
        try:
            if context is not None:
                connection: http.client.HTTPConnection = http.client.HTTPSConnection(LOOPBACK, port, timeout=2, context=context)
            else:
                connection = http.client.HTTPConnection(LOOPBACK, port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.3)
    raise DeploymentError(f"the SuperLink did not answer within {STARTUP_TIMEOUT_S:.0f} s:\n{log_tail(log_path)}")


def wait_for_port(host: str, port: int, process: subprocess.Popen, log_path: Path, what: str) -> None:
    """Block until `host:port` accepts connections, or raise with the process log's last lines."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    connect_host = LOOPBACK if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DeploymentError(f"{what} exited with code {process.returncode} while starting:\n{log_tail(log_path)}")
        try:
            with socket.create_connection((connect_host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise DeploymentError(f"{what} did not open port {port} within {STARTUP_TIMEOUT_S:.0f} s:\n{log_tail(log_path)}")


def log_tail(path: Path, lines: int = 25) -> str:
    """The last lines of a log file (or a note that it is empty)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text[-lines:]) if text else f"(the log {path} is empty)"


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children in new sessions included), read from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(entry.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, owner in parents.items() if owner == parent]
        found += children
        frontier += children
    return found


def stop_process(process: subprocess.Popen, first_signal: int = signal.SIGTERM, grace: float = STOP_GRACE_S) -> None:
    """Ask a child to stop, wait `grace` seconds, then kill it."""
    if process.poll() is not None:
        return
    try:
        process.send_signal(first_signal)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)
    except ProcessLookupError:
        pass


def stop_pids(pids: Sequence[int], grace: float = 5.0) -> None:
    """SIGTERM then SIGKILL the given processes (left-over SuperExec and ServerApp processes)."""
    live = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            live.append(pid)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + grace
    while live and time.monotonic() < deadline:
        live = [pid for pid in live if _alive(pid)]
        time.sleep(0.1)
    for pid in live:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        stat_text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat_text.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class Coordinator:
    """The processes of one `skin-fl-server start`: the SuperLink and nginx, started and stopped together."""

    layout: StateLayout
    public_host: str
    public_port: int
    superlink_port: int
    credentials: Credentials | None
    nginx: str
    say: Callable[[str], None] = print

    def __post_init__(self) -> None:
        self.superlink: subprocess.Popen | None = None
        self.proxy: subprocess.Popen | None = None
        self._stop_requested = False

    @property
    def insecure(self) -> bool:
        """Development mode: no TLS anywhere, no node authentication."""
        return self.credentials is None

    def start(self) -> None:
        """Start the SuperLink, register every site key, then start nginx; raises if any step fails."""
        for folder in (self.layout.root, self.layout.runs_dir, self.layout.logs_dir):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca_cert = self.credentials.ca_cert if self.credentials else None
        write_flower_cli_config(self.layout, self.superlink_port, ca_cert)
        self._start_superlink()
        if self.credentials is not None:
            self._register_site_keys()
        self._start_nginx()
        state = ServerState(
            superlink_port=self.superlink_port,
            public_host=self.public_host,
            public_port=self.public_port,
            insecure=self.insecure,
            ca_cert=str(ca_cert) if ca_cert else None,
            pid=os.getpid(),
        )
        self.layout.state_file.write_text(json.dumps(asdict(state), indent=2) + "\n", encoding="utf-8")

    def serve(self) -> int:
        """Wait until SIGINT/SIGTERM or until a child dies, printing a line per finished round; then stop everything."""
        previous = {number: signal.signal(number, self._request_stop) for number in (signal.SIGINT, signal.SIGTERM)}
        rounds = RoundFollower(self.layout.runs_dir)
        try:
            while not self._stop_requested:
                for line in rounds.new_lines():
                    self.say(line)
                for name, process, log in (
                    ("the SuperLink", self.superlink, self.layout.logs_dir / "superlink.log"),
                    ("nginx", self.proxy, self.layout.logs_dir / "nginx.log"),
                ):
                    if process is not None and process.poll() is not None:
                        self.say(f"skin-fl-server: error: {name} exited with code {process.returncode}:\n{log_tail(log)}")
                        return 1
                time.sleep(0.5)
            self.say("skin-fl-server: stopping nginx and the SuperLink ...")
            return 0
        finally:
            self.stop()
            for number, handler in previous.items():
                signal.signal(number, handler)

    def stop(self) -> None:
        """Stop nginx, then the SuperLink and every process it started."""
        if self.proxy is not None:
            # SIGTERM is nginx's fast shutdown: a graceful SIGQUIT would wait for the SuperNodes'
            # long-lived connections to close.
            stop_process(self.proxy, signal.SIGTERM, grace=5.0)
        if self.superlink is not None:
            started_by_superlink = descendants(self.superlink.pid)
            stop_process(self.superlink)
            stop_pids([pid for pid in started_by_superlink if _alive(pid)])

    def _request_stop(self, signal_number, frame) -> None:
        self._stop_requested = True

    def _start_superlink(self) -> None:
        command = [venv_executable("flower-superlink")]
        if self.credentials is None:
            command += ["--insecure"]
        else:
            command += [
                "--ssl-certfile", str(self.credentials.server_cert),
                "--ssl-keyfile", str(self.credentials.server_key),
                "--ssl-ca-certfile", str(self.credentials.ca_cert),
                "--enable-supernode-auth",
            ]
        # Flower's in-memory run state (no --database): with its SQLite file every message's objects
        # went through SQL bookkeeping and a loopback round took twice as long. What lives only in
        # the SuperLink is rebuilt at each start: the site keys are registered again from the
        # credentials folder, and a run is resumed from its run folder, which `status` lists.
        command += [
            "--disable-runtime-dependency-installation",
            "--host", LOOPBACK,
            "--port", str(self.superlink_port),
        ]
        log_path = self.layout.logs_dir / "superlink.log"
        self.superlink = _spawn(command, flower_environment(self.layout), log_path, cwd=self.layout.root)
        wait_for_superlink(self.superlink_port, self.credentials.ca_cert if self.credentials else None, self.superlink, log_path)
        self.say(f"SuperLink on https://{LOOPBACK}:{self.superlink_port} (loopback only)"
                 if self.credentials else f"SuperLink on http://{LOOPBACK}:{self.superlink_port} (loopback only, NO TLS)")

    def _register_site_keys(self) -> None:
        from coordinator.site_keys import sync_site_keys

        assert self.credentials is not None
        sync_site_keys(self.layout, self.credentials, self.say)

    def _start_nginx(self) -> None:
        listen = f"[{self.public_host}]:{self.public_port}" if ":" in self.public_host else f"{self.public_host}:{self.public_port}"
        settings = ProxySettings(
            listen=listen,
            superlink_address=f"{LOOPBACK}:{self.superlink_port}",
            nginx_dir=self.layout.nginx_dir,
            server_cert=self.credentials.server_cert if self.credentials else None,
            server_key=self.credentials.server_key if self.credentials else None,
            ca_cert=self.credentials.ca_cert if self.credentials else None,
        )
        write_config(settings)
        log_path = self.layout.logs_dir / "nginx.log"
        checked = subprocess.run(
            [*nginx_command(self.nginx, settings)[:-2], "-t", "-q"], capture_output=True, text=True, check=False
        )
        if checked.returncode != 0:
            raise DeploymentError(f"nginx rejected the generated config {settings.config_path}:\n{checked.stderr.strip()}")
        self.proxy = _spawn(nginx_command(self.nginx, settings), dict(os.environ), log_path, cwd=self.layout.nginx_dir)
        wait_for_port(self.public_host, self.public_port, self.proxy, log_path, "nginx")
        scheme = "https" if self.credentials else "http"
        self.say(f"nginx on {scheme}://{listen}: forwards only the Fleet API (/v1/fleet/...) to the SuperLink")


def _spawn(command: list[str], environment: dict[str, str], log_path: Path, cwd: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, stdin=subprocess.DEVNULL)


def prepare_coordinator(
    state_dir: Path,
    credentials_dir: Path | None,
    public_host: str,
    public_port: int,
    superlink_port: int,
    nginx: str | None,
    insecure: bool,
    say: Callable[[str], None] = print,
) -> Coordinator:
    """Check every input (credentials, ports, nginx) before anything starts; returns the ready Coordinator."""
    if insecure and not is_loopback(public_host):
        raise ConfigError(
            f"--insecure (no TLS, no node authentication) listens on loopback only, not on {public_host}; "
            "drop --host, or run with --credentials for other machines to connect"
        )
    credentials = None if insecure else check_credentials(credentials_dir) if credentials_dir else None
    if credentials is None and not insecure:
        raise ConfigError("--credentials FOLDER is required (the folder skin-fl-certs wrote); --insecure is for local development only.")
    nginx_path = find_nginx(nginx)
    if public_port == superlink_port:
        raise ConfigError(f"--port and --superlink-port are both {public_port}; give them different ports.")
    ensure_port_free(public_host, public_port, "the public port nginx listens on", "--port")
    ensure_port_free(LOOPBACK, superlink_port, "the SuperLink's loopback port", "--superlink-port")
    layout = StateLayout(Path(state_dir).expanduser().resolve())
    return Coordinator(layout, public_host, public_port, superlink_port, credentials, nginx_path, say)
