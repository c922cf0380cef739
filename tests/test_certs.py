"""skin-fl-certs: the CA, server certificate and node keys verify, load in Flower, are written safely, and start-up kits start a site."""

import argparse
import datetime
import ipaddress
import socket
import ssl
import stat
import tarfile
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

from client.site_config import build_site_settings, check_ca_certificate, check_site_key, read_site_file
from coordinator.certs import add_site, init_credentials, main, site_file_stem
from coordinator.startup_kit import write_startup_kits
from shared.errors import ConfigError


def _certificate(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def credentials(tmp_path):
    """A credentials folder for two sites, one with a space and an apostrophe in its name."""
    out_dir = tmp_path / "creds"
    init_credentials(out_dir, ["fl.hospital.org", "10.0.0.5"], ["St Mary's", "north"], days=30)
    return out_dir


def test_server_certificate_chain_verifies_against_the_ca_for_every_name(credentials):
    ca_cert, server_cert = _certificate(credentials / "ca.crt"), _certificate(credentials / "server.crt")
    store = Store([ca_cert])
    for subject in [x509.DNSName("fl.hospital.org"), x509.DNSName("localhost")]:
        chain = PolicyBuilder().store(store).build_server_verifier(subject).verify(server_cert, [])
        assert chain[-1] == ca_cert
    for address in ["10.0.0.5", "127.0.0.1"]:
        subject = x509.IPAddress(ipaddress.ip_address(address))
        PolicyBuilder().store(store).build_server_verifier(subject).verify(server_cert, [])
    with pytest.raises(x509.verification.VerificationError):
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName("other.org")).verify(server_cert, [])


def test_ca_is_a_signing_authority_and_san_holds_given_names_plus_loopback(credentials):
    ca_cert, server_cert = _certificate(credentials / "ca.crt"), _certificate(credentials / "server.crt")
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca_cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    names = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["fl.hospital.org", "localhost"]
    assert [str(address) for address in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "127.0.0.1"]


def test_tls_handshake_to_127_0_0_1_succeeds_with_the_ca(credentials):
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(credentials / "server.crt", credentials / "server.key")
    client_context = ssl.create_default_context(cafile=str(credentials / "ca.crt"))
    server_socket, client_socket = socket.socketpair()
    with server_socket, client_socket:
        def serve() -> None:
            with server_context.wrap_socket(server_socket, server_side=True) as tls:
                tls.recv(1)

        handshake = threading.Thread(target=serve)
        handshake.start()
        with client_context.wrap_socket(client_socket, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            tls.sendall(b"x")
        handshake.join(timeout=5)


def test_node_keys_load_with_flowers_own_loaders_and_match(credentials):
    stem = site_file_stem("St Mary's")
    private_key, public_key = _try_setup_client_authentication(
        argparse.Namespace(auth_supernode_private_key=str(credentials / "sites" / f"{stem}.key"),
                           auth_supernode_public_key=None)
    )
    assert isinstance(private_key.curve, ec.SECP384R1)
    registered = try_load_public_key(credentials / "sites" / f"{stem}.pub")
    assert registered == public_key_to_bytes(public_key)


def test_secret_files_are_owner_only_and_public_files_world_readable(credentials):
    for secret in ["ca.key", "server.key", "sites/st-marys.key", "sites/north.key"]:
        assert _mode(credentials / secret) == 0o600, secret
    for public in ["ca.crt", "server.crt", "sites/st-marys.pub", "README.txt"]:
        assert _mode(credentials / public) == 0o644, public


def test_days_set_the_server_certificates_validity_and_ca_days_the_cas(credentials):
    now = datetime.datetime.now(datetime.timezone.utc)
    for name, days in [("server.crt", 30), ("ca.crt", 3650)]:
        certificate = _certificate(credentials / name)
        assert abs(certificate.not_valid_after_utc - (now + datetime.timedelta(days=days))) < datetime.timedelta(minutes=1)
        assert certificate.not_valid_before_utc < now


def test_init_refuses_to_overwrite_without_force_and_replaces_with_it(credentials):
    old_ca = (credentials / "ca.crt").read_bytes()
    with pytest.raises(ConfigError, match=r"ca\.key.*already exist.*--force"):
        init_credentials(credentials, ["fl.hospital.org"], ["north"])
    assert (credentials / "ca.crt").read_bytes() == old_ca
    init_credentials(credentials, ["fl.hospital.org"], ["north"], force=True)
    assert (credentials / "ca.crt").read_bytes() != old_ca
    assert _mode(credentials / "ca.key") == 0o600


def test_add_site_writes_one_more_key_pair_and_lists_it(credentials, capsys):
    assert main(["add-site", "--out", str(credentials), "--site", "Hôpital Est"]) == 0
    printed = capsys.readouterr().out
    assert 'Site "Hôpital Est" (runs skin-fl-client --site "Hôpital Est")' in printed
    assert "sites/hopital-est.key" in printed
    assert _mode(credentials / "sites" / "hopital-est.key") == 0o600
    readme = (credentials / "README.txt").read_text(encoding="utf-8")
    assert 'site "Hôpital Est"' in readme and "St Mary's" in readme
    with pytest.raises(ConfigError, match=r"hopital-est\.key.*--force"):
        add_site(credentials, "Hôpital Est")


def test_site_names_that_share_a_file_name_are_refused(credentials):
    with pytest.raises(ConfigError, match=r"already holds the key of site \"St Mary's\""):
        add_site(credentials, "St Mary’s", force=True)


def test_listing_says_which_files_go_to_which_machine(credentials):
    readme = (credentials / "README.txt").read_text(encoding="utf-8")
    files_by_section = {
        block.splitlines()[0]: [line.split()[0] for line in block.splitlines()[1:]] for block in readme.split("\n\n")
    }
    assert files_by_section["Coordinator (runs skin-fl-server):"] == [
        "ca.crt", "server.crt", "server.key", "sites/north.pub", "sites/st-marys.pub"
    ]
    assert files_by_section['Site "north" (runs skin-fl-client --site north):'] == ["ca.crt", "sites/north.key"]
    assert files_by_section['Site "St Mary\'s" (runs skin-fl-client --site "St Mary\'s"):'] == [
        "ca.crt", "sites/st-marys.key"
    ]


def test_bad_server_name_and_days_are_refused(tmp_path, capsys):
    assert main(["init", "--out", str(tmp_path), "--server-name", "https://fl.org:8000", "--site", "a"]) == 2
    assert "no https://, no port" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--days 0"):
        init_credentials(tmp_path, ["fl.org"], ["a"], days=0)
    assert not any(tmp_path.iterdir())


def test_the_ca_outlives_the_server_certificate_and_renewal_keeps_the_sites_trust(credentials):
    from coordinator.certs import renew_server

    ca_cert, old = _certificate(credentials / "ca.crt"), _certificate(credentials / "server.crt")
    assert ca_cert.not_valid_after_utc - old.not_valid_after_utc > datetime.timedelta(days=3000)
    old_key = (credentials / "server.key").read_bytes()
    written = renew_server(credentials, days=90)
    assert [file.path for file in written] == ["server.key", "server.crt"]
    new = _certificate(credentials / "server.crt")
    assert (credentials / "server.key").read_bytes() != old_key and _mode(credentials / "server.key") == 0o600
    assert new.serial_number != old.serial_number
    assert datetime.timedelta(days=89) < new.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc) <= datetime.timedelta(days=90)
    # Same names, same CA: a site's ca.crt verifies the new certificate as it did the old one.
    store = Store([_certificate(credentials / "ca.crt")])
    for subject in [x509.DNSName("fl.hospital.org"), x509.IPAddress(ipaddress.ip_address("10.0.0.5"))]:
        PolicyBuilder().store(store).build_server_verifier(subject).verify(new, [])
    with pytest.raises(ConfigError, match="CA expires on"):
        renew_server(credentials, days=5000)
    (credentials / "ca.key").unlink()
    with pytest.raises(ConfigError, match="bring the CA key back"):
        renew_server(credentials)
    with pytest.raises(ConfigError, match="--ca-days 10 is shorter than --days 30"):
        init_credentials(credentials.parent / "other", ["fl.hospital.org"], ["north"], days=30, ca_days=10)


def _settings_from(site_toml, data_dir):
    """What skin-fl-client --config SITE_TOML --data DATA_DIR validates, and its two credential checks."""
    settings = build_site_settings(read_site_file(site_toml), {"data.dir": str(data_dir)}, str(site_toml))
    check_ca_certificate(settings.ca_cert)
    check_site_key(settings.site_key, settings.site)
    return settings


def test_every_site_gets_a_kit_whose_site_toml_passes_the_clients_checks(credentials, tmp_path):
    assert main(["kit", "--out", str(credentials), "--superlink", "fl.hospital.org:9443"]) == 0
    kit = credentials / "kits" / "st-marys"
    assert sorted(path.name for path in kit.iterdir()) == ["README.txt", "ca.crt", "site.toml", "st-marys.key"]
    assert (credentials / "kits" / "north" / "north.key").read_bytes() == (credentials / "sites" / "north.key").read_bytes()
    assert _mode(kit / "st-marys.key") == 0o600 and _mode(kit) == 0o700 and _mode(credentials / "kits") == 0o700
    assert _mode(credentials / "kits" / "st-marys.tar.gz") == 0o600
    assert (kit / "ca.crt").read_bytes() == (credentials / "ca.crt").read_bytes()

    settings = _settings_from(kit / "site.toml", tmp_path / "images")
    assert settings.site == "St Mary's" and settings.superlink == "fl.hospital.org:9443"
    assert settings.ca_cert == kit / "ca.crt" and settings.site_key == kit / "st-marys.key"
    assert settings.data.dir == tmp_path / "images"
    assert "skin-fl-client --config /etc/skin-fl/st-marys/site.toml" in (kit / "README.txt").read_text()

    with pytest.raises(ConfigError, match=r"data\.dir: Field required"):
        build_site_settings(read_site_file(kit / "site.toml"), {}, "site.toml")


def test_the_archive_unpacks_elsewhere_with_a_private_key_and_paths_that_follow_it(credentials, tmp_path):
    write_startup_kits(credentials, "10.0.0.5:9443", ["north"])
    assert not (credentials / "kits" / "st-marys").exists()
    with tarfile.open(credentials / "kits" / "north.tar.gz") as archive:
        modes = {member.name: member.mode for member in archive.getmembers()}
        archive.extractall(tmp_path / "site-machine", filter="data")
    assert modes == {"north": 0o700, "north/ca.crt": 0o644, "north/north.key": 0o600, "north/site.toml": 0o644, "north/README.txt": 0o644}
    unpacked = tmp_path / "site-machine" / "north"
    assert _mode(unpacked / "north.key") == 0o600
    settings = _settings_from(unpacked / "site.toml", tmp_path / "images")
    assert settings.site_key == unpacked / "north.key" and settings.superlink == "10.0.0.5:9443"


def test_an_address_outside_the_server_certificate_or_an_unknown_site_is_refused_with_the_fix(credentials):
    with pytest.raises(ConfigError, match=r"not a name of the server certificate.*renew-server --out .* --server-name fl\.other\.org"):
        write_startup_kits(credentials, "fl.other.org:9443")
    with pytest.raises(ConfigError, match=r"host:port"):
        write_startup_kits(credentials, "https://fl.hospital.org")
    with pytest.raises(ConfigError, match=r"no key pair for site\(s\) 'south'.*add-site"):
        write_startup_kits(credentials, "FL.Hospital.org:9443", ["south"])
    assert not (credentials / "kits").exists()
    write_startup_kits(credentials, "127.0.0.1:9443", ["north"])


def test_relative_paths_of_a_site_file_are_taken_from_its_folder(tmp_path):
    folder = tmp_path / "etc" / "skin-fl"
    folder.mkdir(parents=True)
    (folder / "site.toml").write_text(
        'site = "north"\nsuperlink = "fl.hospital.org:9443"\nca-cert = "ca.crt"\nsite-key = "~/north.key"\n'
        'state-dir = "/var/lib/skin-fl"\n[data]\ndir = "../images"\ncache-dir = "cache"\n'
    )
    values = read_site_file(folder / "site.toml")
    assert values["ca-cert"] == str(folder / "ca.crt")
    assert values["site-key"] == "~/north.key" and values["state-dir"] == "/var/lib/skin-fl"
    assert values["data"] == {"dir": str(folder / "../images"), "cache-dir": str(folder / "cache")}
