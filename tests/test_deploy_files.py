"""Every config file shipped in deploy/ parses, and the commands it runs match the real command-line options."""

import configparser
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from client.cli import build_parser as client_parser
from client.site_config import SiteSettings
from coordinator.certs import build_parser as certs_parser
from coordinator.certs import init_credentials
from coordinator.cli import build_parser as server_parser
from coordinator.nginx_proxy import ProxySettings, render_config
from server.run_config_file import app_directory, read_run_config_file

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
PARSERS = {"skin-fl-server": server_parser, "skin-fl-client": client_parser, "skin-fl-certs": certs_parser}


def parse_command(arguments: list[str]):
    """Parse a skin-fl-server / skin-fl-client argument list with the real parser (SystemExit on a stale flag)."""
    program = Path(arguments[0]).name
    return PARSERS[program]().parse_args(arguments[1:])


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return instructions


def test_every_toml_file_in_deploy_parses_and_the_known_ones_validate():
    files = sorted(DEPLOY.rglob("*.toml"))
    assert DEPLOY / "sites" / "example-site.toml" in files and DEPLOY / "run-config.example.toml" in files
    for path in files:
        tomllib.loads(path.read_text(encoding="utf-8"))
    site = SiteSettings.model_validate(tomllib.loads((DEPLOY / "sites" / "example-site.toml").read_text()))
    assert site.site == "St Mary's Hospital" and not site.insecure
    _, run = read_run_config_file(DEPLOY / "run-config.example.toml", app_directory())
    assert run.federation.rounds >= 1


@pytest.mark.parametrize("name", ["server", "site"])
def test_dockerfiles_install_torch_first_then_the_project_and_run_the_right_command(name):
    path = DEPLOY / "docker" / f"{name}.Dockerfile"
    instructions = dockerfile_instructions(path)
    keywords = [keyword for keyword, _ in instructions]
    assert set(keywords) <= {"FROM", "ENV", "ARG", "RUN", "WORKDIR", "COPY", "USER", "VOLUME", "EXPOSE", "ENTRYPOINT", "CMD"}
    assert instructions[0] == ("FROM", "python:3.11-slim")
    runs = [arguments for keyword, arguments in instructions if keyword == "RUN"]
    torch_step = next(index for index, command in enumerate(runs) if "-c constraints.txt torch torchvision" in command)
    project_step = next(index for index, command in enumerate(runs) if "pip install -c constraints.txt -e ." in command)
    assert torch_step < project_step
    for keyword, arguments in instructions:
        if keyword == "COPY":
            *sources, _ = arguments.split()
            for source in sources:
                assert (REPO / source).exists(), f"{path} copies {source}, which is not in the repository"
    ignore = (path.parent / f"{path.name}.dockerignore").read_text().splitlines()
    assert "**" in ignore and "!.venv" not in ignore
    import json

    entrypoint = json.loads(dict(instructions)["ENTRYPOINT"])
    command = json.loads(dict(instructions)["CMD"])
    expected = {"server": "skin-fl-server", "site": "skin-fl-client"}[name]
    assert entrypoint == [expected]
    # The package of the entry point's console script is copied in and not ignored.
    import tomllib

    package = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"][expected].split(".")[0]
    copied = {source for keyword, arguments in instructions if keyword == "COPY" for source in arguments.split()[:-1]}
    assert package in copied and f"!{package}/**" in ignore
    parse_command(entrypoint + command)
    if name == "server":
        assert any("apt-get install" in command and "nginx" in command for command in runs)


def test_compose_file_runs_a_server_and_two_sites_with_valid_commands_and_mounts():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"server", "hospital-a", "hospital-b"}
    site_keys = set()
    for name, service in services.items():
        build = service["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve().is_file(), name
        program = "skin-fl-server" if name == "server" else "skin-fl-client"
        arguments = parse_command([program, *service["command"]])
        # ${VAR:?message} host paths hold colons of their own; they name a host folder.
        volumes = [re.sub(r"\$\{[^}]*\}", "HOST_FOLDER", volume).split(":") for volume in service["volumes"]]
        mounts = {parts[1]: parts[0] for parts in volumes}
        if name == "server":
            assert arguments.credentials == Path("/credentials") and mounts["/credentials"] == "./credentials"
            assert service["ports"] == ["9443:9443"]
        else:
            assert service["depends_on"] == ["server"]
            assert arguments.superlink == "server:9443"
            for container_path in (str(arguments.ca_cert), str(arguments.site_key), str(arguments.data), str(arguments.state_dir)):
                assert container_path in mounts, (name, container_path)
            site_keys.add(arguments.site_key)
            # Two sites on one host: each trains with half the CPUs.
            assert arguments.sites_on_host == 2
    assert len(site_keys) == 2


def test_systemd_units_parse_and_run_valid_commands():
    for unit_name in ("skin-fl-server.service", "skin-fl-client@.service"):
        unit = configparser.ConfigParser(interpolation=None, strict=True)
        unit.optionxform = str
        unit.read(DEPLOY / "systemd" / unit_name)
        assert unit.sections() == ["Unit", "Service", "Install"], unit_name
        service = unit["Service"]
        command = shlex.split(service["ExecStart"].replace("%i", "st-marys"))
        arguments = parse_command(command)
        assert service["User"] == "skin-fl" and service["Restart"] == "on-failure"
        assert "FLWR_TELEMETRY_ENABLED=0" in service["Environment"]
        if unit_name.startswith("skin-fl-server"):
            assert arguments.command == "start" and arguments.state_dir == Path("/var/lib/skin-fl-server")
        else:
            assert arguments.config == Path("/etc/skin-fl/sites/st-marys.toml")
            assert set(service["RestartPreventExitStatus"].split()) == {"2", "3"}


def test_readme_commands_use_only_real_options():
    text = (DEPLOY / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```(?:sh|bash|console)?\n(.*?)```", text, flags=re.S)
    checked = 0
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split(" #", 1)[0]) if line.strip() and not line.lstrip().startswith("#") else []
            words = words[:-1] if words and words[-1] == "&" else words
            while words and "=" in words[0] and not words[0].startswith("-"):
                words = words[1:]  # VAR=value prefixes
            if words and words[0] == "sudo":
                words = words[words.index("-u") + 2:] if "-u" in words else words[1:]
            if words and Path(words[0]).name in PARSERS:
                parse_command(words)
                checked += 1
    assert checked >= 8, f"only {checked} skin-fl-server/skin-fl-client commands found in deploy/README.md"


@pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(), reason="nginx not installed")
def test_the_shipped_nginx_template_renders_to_a_config_nginx_accepts(tmp_path):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    credentials = tmp_path / "credentials"
    init_credentials(credentials, ["localhost"], ["Hospital A"], days=1)
    template = (DEPLOY / "nginx" / "skin-fl-proxy.conf.template").read_text()
    settings = ProxySettings(
        listen="127.0.0.1:9443", superlink_address="127.0.0.1:9444", nginx_dir=tmp_path / "nginx",
        server_cert=credentials / "server.crt", server_key=credentials / "server.key", ca_cert=credentials / "ca.crt",
    )
    for folder in (settings.nginx_dir / "logs", settings.nginx_dir / "temp"):
        folder.mkdir(parents=True)
    settings.config_path.write_text(render_config(settings, template))
    checked = subprocess.run(
        [nginx, "-t", "-q", "-p", str(settings.nginx_dir), "-c", str(settings.config_path), "-e", "stderr"],
        capture_output=True, text=True, timeout=30,
    )
    assert checked.returncode == 0, checked.stderr
