"""skin-fl-server without a running federation: run-config files, the nginx config, and clear errors on bad input."""

import http.server
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import tomllib
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.routing import APIRoute

from coordinator import cli
from coordinator.certs import init_credentials
from coordinator.deployment import check_credentials
from coordinator.nginx_proxy import (
    TEMPLATE_PATH,
    ProxySettings,
    find_nginx,
    fleet_paths_in_template,
    nginx_command,
    render_config,
    write_config,
)
from server.history import MetricHistory
from server.run_config_file import app_directory, read_run_config_file
from shared.config import FLOWER_RUN_CONFIG_KEYS, run_config_from_flower
from shared.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
DEPLOY_NGINX = REPO / "deploy" / "nginx"


@pytest.fixture(scope="module")
def credentials(tmp_path_factory):
    folder = tmp_path_factory.mktemp("server-cli") / "credentials"
    init_credentials(folder, ["fl.example.org"], ["Alpha Clinic", "beta"], days=1)
    return folder


def test_example_run_config_is_valid_and_uses_known_keys():
    example = REPO / "deploy" / "run-config.example.toml"
    values = tomllib.loads(example.read_text())
    assert set(values) <= set(FLOWER_RUN_CONFIG_KEYS)
    overrides, run = read_run_config_file(example, app_directory())
    assert overrides == values
    assert run == run_config_from_flower(
        {key: value for key, value in {**_app_defaults(), **values}.items() if key != "resume-folder"}
    )
    assert run.federation.rounds == values["num-server-rounds"]


def _app_defaults() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_run_config_file_errors_name_the_fix(tmp_path):
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('num-server-rounds = 3\nnum-rounds = 3\n')
    with pytest.raises(ConfigError, match=r"unknown run-config key\(s\) \['num-rounds'\]; known keys are"):
        read_run_config_file(unknown, app_directory())
    nested = tmp_path / "nested.toml"
    nested.write_text("[federation]\nrounds = 3\n")
    with pytest.raises(ConfigError, match="flat kebab-case keys only"):
        read_run_config_file(nested, app_directory())
    resume = tmp_path / "resume.toml"
    resume.write_text('resume-folder = "/tmp/x"\n')
    with pytest.raises(ConfigError, match="--resume RUN_FOLDER"):
        read_run_config_file(resume, app_directory())
    invalid = tmp_path / "invalid.toml"
    invalid.write_text('strategy = "fedsgd"\n')
    with pytest.raises(ConfigError, match="invalid run config"):
        read_run_config_file(invalid, app_directory())
    with pytest.raises(ConfigError, match="does not exist; start from deploy/run-config.example.toml"):
        read_run_config_file(tmp_path / "missing.toml", app_directory())


def test_shipped_nginx_template_is_the_one_the_server_uses():
    assert (DEPLOY_NGINX / "skin-fl-proxy.conf.template").read_text() == TEMPLATE_PATH.read_text()


def test_proxy_forwards_exactly_the_fleet_api_of_the_installed_flower():
    from flwr.superlink.routers.fleet.router import router

    fleet_routes = sorted(route.path.removeprefix("/v1/fleet/") for route in router.routes if isinstance(route, APIRoute))
    assert sorted(fleet_paths_in_template()) == fleet_routes
    # What the SuperNode calls is a subset of what is forwarded.
    import flwr.supernode.fleet_http_client as fleet_client

    called = set(_fleet_paths_in_source(Path(fleet_client.__file__).read_text()))
    assert called and called <= set(fleet_routes)


def _fleet_paths_in_source(source: str) -> list[str]:
    import re

    return re.findall(r'"/v1/fleet/([a-z-]+)"', source)


def _example_settings(credentials_dir: Path, nginx_dir: Path, **changes) -> ProxySettings:
    values = dict(
        listen="0.0.0.0:9443",
        superlink_address="127.0.0.1:9444",
        nginx_dir=nginx_dir,
        server_cert=credentials_dir / "server.crt",
        server_key=credentials_dir / "server.key",
        ca_cert=credentials_dir / "ca.crt",
        worker_user="www-data www-data",
    )
    values.update(changes)
    return ProxySettings(**values)


def test_shipped_nginx_example_matches_the_template():
    shipped = (DEPLOY_NGINX / "skin-fl-proxy.conf").read_text()
    expected = render_config(_example_settings(Path("/etc/skin-fl/credentials"), Path("/var/lib/skin-fl/nginx")))
    assert shipped == expected, "regenerate deploy/nginx/skin-fl-proxy.conf from the template"


@pytest.mark.parametrize("insecure", [False, True])
def test_rendered_nginx_config_passes_nginx_own_check(credentials, tmp_path, insecure):
    nginx = find_nginx()
    nginx_dir = tmp_path / "nginx"
    settings = _example_settings(credentials, nginx_dir, listen="127.0.0.1:9443", worker_user=None)
    if insecure:
        settings = ProxySettings(settings.listen, settings.superlink_address, nginx_dir)
    text = render_config(settings)
    assert "@" not in text.replace("@ ", "")
    assert ("ssl_certificate " in text) is not insecure and ("proxy_ssl_verify on;" in text) is not insecure
    config = write_config(settings)
    assert config.read_text() == text
    checked = subprocess.run(
        [nginx, "-t", "-q", "-p", str(nginx_dir), "-c", str(config), "-e", "stderr"], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr


def test_config_paths_with_nginx_syntax_are_refused(credentials, tmp_path):
    with pytest.raises(ConfigError, match="cannot go into the nginx config"):
        render_config(_example_settings(credentials, tmp_path / "a b"))


def _start(tmp_path, *arguments) -> int:
    return cli.main(["--state-dir", str(tmp_path / "state"), "start", *arguments])


def test_start_refuses_missing_credentials(tmp_path, capsys):
    assert _start(tmp_path, "--credentials", str(tmp_path / "nowhere")) == 2
    assert "skin-fl-certs init --out" in capsys.readouterr().err
    assert _start(tmp_path) == 2
    assert "--credentials FOLDER is required" in capsys.readouterr().err


def test_start_refuses_a_readable_server_key_and_a_folder_without_sites(credentials, tmp_path, capsys):
    copy = tmp_path / "credentials"
    shutil.copytree(credentials, copy)
    os.chmod(copy / "server.key", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        check_credentials(copy)
    os.chmod(copy / "server.key", 0o600)
    shutil.rmtree(copy / "sites")
    with pytest.raises(ConfigError, match="skin-fl-certs add-site"):
        check_credentials(copy)


def test_start_refuses_a_port_in_use_and_a_missing_nginx(credentials, tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = _start(tmp_path, "--credentials", str(credentials), "--host", "127.0.0.1", "--port", str(port))
        assert code == 2
        error = capsys.readouterr().err
        assert f"port {port} on 127.0.0.1" in error and "choose another port with --port" in error
    code = _start(tmp_path, "--credentials", str(credentials), "--nginx", str(tmp_path / "no-nginx"))
    assert code == 2
    assert "give the path of the nginx binary" in capsys.readouterr().err
    assert not (tmp_path / "state").exists(), "nothing is written before every check passed"


def test_insecure_start_warns_loudly(tmp_path, capsys):
    code = _start(tmp_path, "--insecure", "--nginx", str(tmp_path / "no-nginx"))
    assert code == 2
    assert "NO TLS and NO node authentication" in capsys.readouterr().err


def test_subcommands_without_a_started_server_say_how_to_start_it(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text("num-server-rounds = 2\n")
    for arguments in (["submit", str(config)], ["status"], ["stop", "1"]):
        assert cli.main(["--state-dir", str(tmp_path / "state"), *arguments]) == 2
        assert "start the server first with 'skin-fl-server start" in capsys.readouterr().err


def test_history_prints_rounds_and_participating_sites(tmp_path, capsys):
    folder = tmp_path / "runs" / "20260101-000000-run-42"
    history = MetricHistory(folder)
    history.record_train(1, {"train-loss": 1.5}, {"Alpha Clinic": {"train-loss": 1.4}, "beta": {"train-loss": 1.6}}, 12.0)
    history.record_evaluate(1, {"balanced-accuracy": 0.5}, {"Alpha Clinic": {"balanced-accuracy": 0.5}}, 3.0)
    history.record_train(2, {"train-loss": 1.2}, {"beta": {"train-loss": 1.2}}, 11.0)
    assert cli.main(["--state-dir", str(tmp_path), "history", str(folder)]) == 0
    output = capsys.readouterr().out
    assert "Alpha Clinic, beta / Alpha Clinic" in output
    assert "    2     1.2000        -     11.0" in output and "beta / -" in output
    # A run id finds the folder the ServerApp named after it.
    assert cli.main(["--state-dir", str(tmp_path), "history", "42"]) == 0
    assert "1.5000" in capsys.readouterr().out
    assert cli.main(["--state-dir", str(tmp_path), "history", "43"]) == 2
    assert "skin-fl-server status" in capsys.readouterr().err


def test_nginx_config_subcommand_prints_the_proxy_config_for_a_system_nginx(credentials, tmp_path, capsys):
    arguments = ["--state-dir", str(tmp_path), "nginx-config", "--credentials", str(credentials), "--listen", "0.0.0.0:8443"]
    assert cli.main(arguments) == 0
    output = capsys.readouterr().out
    assert f"ssl_certificate {credentials.resolve() / 'server.crt'};" in output
    assert "listen 0.0.0.0:8443 ssl;" in output and "user www-data www-data;" in output
    assert "location / {\n            return 403;" in output


def test_insecure_listens_on_loopback_only(tmp_path, capsys):
    assert _start(tmp_path, "--insecure", "--host", "0.0.0.0", "--nginx", str(tmp_path / "no-nginx")) == 2
    assert "--insecure (no TLS, no node authentication) listens on loopback only, not on 0.0.0.0" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _RecordingUpstream(threading.Thread):
    """A plain HTTP server standing where the SuperLink listens; it records every request line it receives."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.paths: list[str] = []
        recorded = self.paths

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the name http.server calls
                recorded.append(self.path)
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def run(self) -> None:
        self.server.serve_forever()


@contextmanager
def _running_nginx(settings: ProxySettings):
    write_config(settings)
    process = subprocess.Popen(nginx_command(find_nginx(), settings), stderr=subprocess.PIPE, text=True)
    port = int(settings.listen.rsplit(":", 1)[1])
    try:
        for _ in range(100):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def _raw_post(port: int, target: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        return int(connection.recv(64).split()[1])


def test_nginx_forwards_only_exact_fleet_paths_of_the_raw_uri(tmp_path):
    upstream = _RecordingUpstream()
    upstream.start()
    settings = ProxySettings(f"127.0.0.1:{_free_port()}", f"127.0.0.1:{upstream.server.server_address[1]}", tmp_path / "nginx")
    with _running_nginx(settings) as port:
        for sneaky in ("/v1/control/../fleet/get-run", "/v1/fleet/../control/list-runs", "/v1/fleet/get-run/../../control/stop-run",
                       "/v1/fleet//get-run", "/v1/fleet/%67et-run", "/v1/fleet/get-run?x=1", "/v1/fleet/./get-run"):
            assert _raw_post(port, sneaky) == 403, sneaky
        assert upstream.paths == []
        assert _raw_post(port, "/v1/fleet/get-run") == 200
    upstream.server.shutdown()
    assert upstream.paths == ["/v1/fleet/get-run"]


def test_nginx_speaks_tls_1_3_only(credentials, tmp_path):
    settings = _example_settings(credentials, tmp_path / "nginx", listen=f"127.0.0.1:{_free_port()}", worker_user=None)
    with _running_nginx(settings) as port:
        old = ssl.create_default_context(cafile=str(credentials / "ca.crt"))
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(ssl.SSLError):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, old.wrap_socket(raw, server_hostname="fl.example.org"):
                pass
        current = ssl.create_default_context(cafile=str(credentials / "ca.crt"))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with current.wrap_socket(raw, server_hostname="fl.example.org") as tls:
                assert tls.version() == "TLSv1.3"


def test_status_lists_the_runs_of_earlier_starts_from_their_folders(tmp_path, monkeypatch, capsys):
    # The SuperLink keeps its run list in memory: runs from before a restart are known by their folders.
    import json

    from coordinator.deployment import StateLayout

    layout = StateLayout(tmp_path)
    layout.state_file.parent.mkdir(parents=True, exist_ok=True)
    layout.state_file.write_text(json.dumps({
        "superlink_port": 1, "public_host": "localhost", "public_port": 2, "insecure": False, "ca_cert": None, "pid": 3,
    }))
    finished = tmp_path / "runs" / "20260101-000000-run-41"
    MetricHistory(finished).record_train(1, {}, {"a": {}}, 1.0)
    (finished / "final_model.pt").write_bytes(b"")
    unfinished = tmp_path / "runs" / "20260102-000000-run-42"
    MetricHistory(unfinished).record_train(1, {}, {"a": {}}, 1.0)
    current = tmp_path / "runs" / "20260103-000000-run-43"
    current.mkdir()
    monkeypatch.setattr(cli, "run_flower_cli", lambda layout, arguments, **_: {
        "success": True, "runs": [{"run-id": 43, "status": "running", "elapsed": "00:01:00"}],
    })
    assert cli.main(["--state-dir", str(tmp_path), "status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in lines[1:4]] == [
        ["41", "earlier:", "completed"], ["42", "earlier:", "unfinished"], ["43", "running", "00:01:00"],
    ]
    assert "--resume FOLDER" in lines[-1]
