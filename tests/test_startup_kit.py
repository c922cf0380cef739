"""skin-fl-certs kit: each site's folder and archive start skin-fl-client's checks with only a dataset folder added."""

import stat
import tarfile

import pytest

from client.site_config import build_site_settings, check_ca_certificate, check_site_key, read_site_file
from server.certs import init_credentials, main
from server.startup_kit import write_startup_kits
from shared.errors import ConfigError


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def credentials(tmp_path):
    out_dir = tmp_path / "creds"
    init_credentials(out_dir, ["fl.hospital.org", "10.0.0.5"], ["St Mary's", "north"], days=30)
    return out_dir


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
