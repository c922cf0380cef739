"""skin-fl-client: local checks before connecting, node-config quoting, and SuperNode messages in plain words."""

import os
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from client.cli import (
    EXIT_BAD_SETUP,
    EXIT_GAVE_UP,
    SupernodeSupervisor,
    build_parser,
    main,
    supernode_command,
    supernode_environment,
)
from client.site_config import (
    SiteSettings,
    build_site_settings,
    check_ca_certificate,
    check_site_key,
    node_config_toml,
    read_site_file,
)
from client.supernode_output import ConnectionContext, OutputWatcher, classify_line
from coordinator.certs import init_credentials
from shared.data.demo import write_demo_dataset
from shared.device import usable_cpu_count
from shared.errors import ConfigError
from shared.network import parse_server_address

REPO = Path(__file__).resolve().parent.parent
SITE = "St Mary's \"Kinder\" Klinik Zürich"


@pytest.fixture(scope="module")
def credentials(tmp_path_factory):
    folder = tmp_path_factory.mktemp("credentials")
    init_credentials(folder, ["localhost"], [SITE, "Other"], days=30)
    return folder


@pytest.fixture(scope="module")
def site_data(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "site images", format="folder", num_images=60, seed=3)


def site_key(credentials) -> Path:
    (key,) = [path for path in (credentials / "sites").glob("*.key") if "kinder" in path.name]
    return key


@pytest.mark.parametrize("address, expected", [
    ("fl.example.org:9443", ("fl.example.org", 9443)),
    ("10.0.0.5:443", ("10.0.0.5", 443)),
    ("[2001:db8::5]:9443", ("2001:db8::5", 9443)),
    ("localhost:1", ("localhost", 1)),
])
def test_well_formed_server_addresses_are_accepted(address, expected):
    assert parse_server_address(address) == expected


@pytest.mark.parametrize("address, complaint", [
    ("https://fl.example.org:9443", "without a scheme"),
    ("fl.example.org", "is not host:port"),
    ("fl.example.org:99999", "not between 1 and 65535"),
    ("fl_example!.org:9443", "not a valid host name"),
    ("[zz::1]:9443", "not an IPv6 address"),
    ("fl.example.org:9443/v1", "without a scheme or path"),
])
def test_malformed_server_addresses_say_how_to_write_them(address, complaint):
    with pytest.raises(ConfigError, match=complaint):
        parse_server_address(address)


def test_a_readable_site_key_is_refused_with_the_chmod_fix(credentials, tmp_path):
    key = tmp_path / "site.key"
    key.write_bytes(site_key(credentials).read_bytes())
    key.chmod(0o640)
    with pytest.raises(ConfigError, match=rf"mode 640.*chmod 600 {key}"):
        check_site_key(key, SITE)
    key.chmod(0o600)
    assert check_site_key(key, SITE) == key


def test_missing_public_or_foreign_key_files_are_explained(credentials, tmp_path):
    with pytest.raises(ConfigError, match="does not exist; ask the coordinator for the node key"):
        check_site_key(tmp_path / "absent.key", SITE)
    with pytest.raises(ConfigError, match="no site key given"):
        check_site_key(None, SITE)
    public = next((credentials / "sites").glob("*.pub"))
    copy = tmp_path / "copy.pub"
    copy.write_bytes(public.read_bytes())
    copy.chmod(0o600)
    with pytest.raises(ConfigError, match="public half of the key"):
        check_site_key(copy, SITE)
    server_key = tmp_path / "server.key"
    server_key.write_bytes((credentials / "server.key").read_bytes())
    server_key.chmod(0o600)
    with pytest.raises(ConfigError, match="not an unencrypted OpenSSH private key"):
        check_site_key(server_key, SITE)


def test_the_ca_file_must_exist_and_be_the_ca_certificate(credentials, tmp_path):
    assert check_ca_certificate(credentials / "ca.crt") == credentials / "ca.crt"
    with pytest.raises(ConfigError, match="does not exist; ask the coordinator for the federation's ca.crt"):
        check_ca_certificate(tmp_path / "ca.crt")
    with pytest.raises(ConfigError, match=r"not a CA certificate \(server.crt instead of ca.crt\?\)"):
        check_ca_certificate(credentials / "server.crt")
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigError, match="is not a PEM certificate"):
        check_ca_certificate(garbage)


def test_node_config_file_keeps_names_with_spaces_and_quotes_exactly_as_flower_reads_them(tmp_path, site_data):
    settings = SiteSettings.model_validate(
        {"site": SITE, "superlink": "localhost:9443", "data": {"dir": str(site_data), "skip-bad": True}}
    )
    path = tmp_path / "dir with space" / "node-config.toml"
    path.parent.mkdir()
    path.write_text(node_config_toml(settings, "folder"), encoding="utf-8")
    read_by_flower = parse_config_args([str(path)])
    assert read_by_flower == {
        "site": SITE, "data-dir": str(site_data.resolve()), "format": "folder", "skip-bad": True, "threads": usable_cpu_count(),
    }
    command = supernode_command(settings.model_copy(update={"insecure": True}), path)
    assert command[command.index("--node-config") + 1] == str(path)


def test_auto_threads_share_the_cpus_among_the_sites_on_the_machine(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    base = {"site": "A", "superlink": "localhost:9443", "data": {"dir": str(tmp_path)}}
    assert SiteSettings.model_validate(base).cpu_threads() == 8
    assert SiteSettings.model_validate({**base, "sites-on-host": 3}).cpu_threads() == 2
    assert SiteSettings.model_validate({**base, "sites-on-host": 16}).cpu_threads() == 1
    assert SiteSettings.model_validate({**base, "threads": 5, "sites-on-host": 4}).cpu_threads() == 5
    assert "threads = 2" in node_config_toml(SiteSettings.model_validate({**base, "sites-on-host": 4}), "folder").splitlines()
    with pytest.raises(ConfigError, match='threads: Value error, threads = 0 is not a thread count; give a positive number or "auto"'):
        build_site_settings({**base, "threads": 0}, {}, "site.toml")
    with pytest.raises(ConfigError, match="sites-on-host: Input should be greater than or equal to 1"):
        build_site_settings(base, {"sites-on-host": 0}, "the command line")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--threads", "many"])
    assert build_parser().parse_args(["--threads", "auto"]).threads == "auto"


def test_the_example_site_file_is_valid_and_options_override_it():
    values = read_site_file(REPO / "deploy" / "sites" / "example-site.toml")
    settings = build_site_settings(values, {"site": "Other site", "data.format": "ham10000", "supernode-port": 9200}, "example")
    assert settings.site == "Other site" and settings.data.format == "ham10000" and settings.supernode_port == 9200
    assert settings.superlink == "fl.example-coordinator.org:9443" and settings.reconnect.max_restarts == 0


def test_incomplete_or_unknown_site_settings_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="superlink: Field required.*example-site.toml"):
        build_site_settings({"site": "A", "data": {"dir": "/x"}}, {}, "the command line")
    with pytest.raises(ConfigError, match="data.colour: Extra inputs are not permitted"):
        build_site_settings({"site": "A", "superlink": "h:1", "data": {"dir": "/x", "colour": 1}}, {}, "site.toml")
    bad = tmp_path / "site.toml"
    bad.write_text("site = 'unterminated\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        read_site_file(bad)


def test_check_mode_validates_everything_and_prints_only_counts(credentials, site_data, tmp_path, capsys):
    key = site_key(credentials)
    common = ["--site", SITE, "--superlink", "localhost:9443", "--ca-cert", str(credentials / "ca.crt"), "--site-key", str(key)]
    assert main([*common, "--data", str(site_data), "--check"]) == 0
    printed = capsys.readouterr().out
    assert "60 labelled images (folder)" in printed and "all local checks passed" in printed
    assert ".png" not in printed and ".jpg" not in printed
    assert main([*common, "--data", str(tmp_path / "nowhere"), "--check"]) == EXIT_BAD_SETUP
    assert "does not exist or is not a folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*common, "--data", str(empty), "--check"]) == EXIT_BAD_SETUP
    assert "cannot tell the format" in capsys.readouterr().err


# Lines flower-supernode 1.41 printed on this machine for each failure (see deploy/README.md).
SUPERNODE_OUTPUTS = {
    "untrusted-server": [
        "ERROR :     SSL/TLS handshake error detected.",
        "ERROR :     Exit Code: 305",
        "Failed to initialize the connection to the SuperLink.",
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer certificate (_ssl.c:1006)",
    ],
    "key-refused": ["ERROR :     Exit Code: 305", "Failed to initialize the connection to the SuperLink.",
                    "[code: 2004] Failed to activate SuperNode."],
    "no-site-key": ["ERROR :     Exit Code: 305",
                    "[code: 2001] SuperNode authentication is enabled. All SuperNodes must be registered via the CLI."],
    "key-unreadable": ["ERROR :     Exit Code: 302", "Unable to parse the private key file."],
    "refused": ["WARNING :   Connection attempt failed, retrying in 0.97 seconds",
                "WARNING :   Giving up reconnection after 1.53 seconds and 3 tries.", "ERROR :     Exit Code: 305",
                "[Errno 111] Connection refused"],
    "name-unknown": ["WARNING :   Giving up reconnection after 0.88 seconds and 3 tries.",
                     "[Errno -2] Name or service not known"],
}


@pytest.mark.parametrize("kind", sorted(SUPERNODE_OUTPUTS))
def test_supernode_failures_are_explained_with_what_to_fix(kind):
    context = ConnectionContext("St Mary's", "fl.example.org:9443", Path("/etc/skin-fl/ca.crt"), Path("/etc/skin-fl/site.key"))
    watcher = OutputWatcher(context)
    for line in SUPERNODE_OUTPUTS[kind]:
        watcher.feed(line)
    diagnosis = watcher.diagnosis()
    assert diagnosis.kind == kind
    fixes = {
        "untrusted-server": "ca.crt from the folder skin-fl-certs wrote",
        "key-refused": "not registered on the server",
        "no-site-key": "--site-key",
        "key-unreadable": "written by skin-fl-certs",
        "refused": "not running yet, or the port 9443 is wrong",
        "name-unknown": "cannot be resolved",
    }
    assert fixes[kind] in diagnosis.message
    assert diagnosis.retry_helps == (kind in ("key-refused", "refused", "name-unknown"))


def test_ordinary_supernode_lines_are_not_problems():
    for line in ("INFO :      SuperNode ID: 6558497511730647804", "INFO:     Uvicorn running on http://127.0.0.1:9311",
                 "INFO :      Starting Flower SuperExec"):
        assert classify_line(line) is None


@pytest.mark.slow
def test_an_unreachable_server_is_explained_and_retried_then_given_up(tmp_path, site_data):
    # A real flower-supernode against a closed loopback port, with short waits.
    import socket

    def free_port() -> int:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]

    settings = SiteSettings.model_validate({
        "site": "A site", "superlink": f"127.0.0.1:{free_port()}", "insecure": True, "data": {"dir": str(site_data)},
        "supernode-port": free_port(), "reconnect": {"supernode-wait-s": 1, "first-backoff-s": 0.5, "max-restarts": 1},
    })
    config = tmp_path / "node-config.toml"
    config.write_text(node_config_toml(settings, "folder"))
    said = []
    supervisor = SupernodeSupervisor(
        settings, supernode_command(settings, config), supernode_environment(tmp_path), tmp_path / "supernode.log", said.append
    )
    assert supervisor.run() == EXIT_GAVE_UP
    assert any("nothing accepts connections" in text for text in said), said
    assert sum("restarting the SuperNode" in text for text in said) == 1
    assert os.path.getsize(tmp_path / "supernode.log") > 0


def test_the_clientapp_sets_the_node_configs_threads_before_it_trains(site_data, tmp_path):
    import torch
    from flwr.app import Context, RecordDict

    from client.site_source import NodeConfigSite
    from shared.config import PreprocessConfig, RunConfig

    run = RunConfig(classes=["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"], preprocess=PreprocessConfig(image_size=32))
    node = {"site": SITE, "data-dir": str(site_data), "format": "folder", "cache-dir": str(tmp_path / "cache")}
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        site = NodeConfigSite().load(Context(1, 1, {**node, "threads": 1}, RecordDict(), {}), run)
        assert torch.get_num_threads() == 1 and len(site.images) == 60
        with pytest.raises(ConfigError, match="threads='two' is not a thread count"):
            NodeConfigSite().load(Context(1, 1, {**node, "threads": "two"}, RecordDict(), {}), run)
    finally:
        torch.set_num_threads(before)
