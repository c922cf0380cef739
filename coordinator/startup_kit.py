"""Start-up kits: per site, one folder and archive with the CA, the site's node key and a filled-in site.toml."""

from __future__ import annotations

import datetime
import io
import ipaddress
import json
import tarfile
from pathlib import Path

from cryptography import x509

from coordinator.certs import (
    CA_CERT,
    PRIVATE_MODE,
    PUBLIC_MODE,
    SERVER_CERT,
    WrittenFile,
    make_private_dir,
    names_in_certificate,
    registered_sites,
    site_key_paths,
    write_credential_file,
)
from shared.errors import ConfigError
from shared.network import parse_server_address
from shared.version import installed_version

KITS_DIR = "kits"
SITE_CONFIG = "site.toml"
KIT_README = "README.txt"


def write_startup_kits(credentials: Path, superlink: str, sites: list[str] | None = None) -> list[WrittenFile]:
    """Write `kits/<site>/` and `kits/<site>.tar.gz` for the named sites (every registered site when None)."""
    for required in (CA_CERT, SERVER_CERT):
        if not (credentials / required).is_file():
            raise ConfigError(
                f"{credentials / required} does not exist; create the credentials first with "
                f"'skin-fl-certs init --out {credentials} --server-name HOST --site NAME'."
            )
    check_server_address(credentials, superlink)
    registered = dict(registered_sites(credentials))
    if not registered:
        raise ConfigError(f"{credentials} holds no site key; add one with 'skin-fl-certs add-site --out {credentials} --site NAME'.")
    chosen = list(registered) if sites is None else sites
    unknown = [site for site in chosen if site not in registered]
    if unknown:
        raise ConfigError(
            f"no key pair for site(s) {', '.join(repr(site) for site in unknown)} in {credentials} (registered: "
            f"{', '.join(repr(site) for site in registered)}); add one with 'skin-fl-certs add-site --out {credentials} --site NAME'."
        )
    written = []
    for site in chosen:
        written += _write_kit(credentials, site, registered[site], superlink)
    return written


def describe_kits(credentials: Path, written: list[WrittenFile]) -> str:
    """The kits just written, and how each reaches its site."""
    archives = [item.path for item in written if item.path.endswith(".tar.gz")]
    lines = [f"start-up kits in {(credentials / KITS_DIR).resolve()}:"]
    lines += [f"  {path.removesuffix('.tar.gz')}/ and {Path(path).name}" for path in archives]
    lines += [
        "Each holds the site's secret node key (mode 600): hand it to that site's IT only, with its modes kept",
        "(scp -p, or the .tar.gz unpacked with tar -xzpf), never by e-mail or chat. Its README.txt says what to do.",
    ]
    return "\n".join(lines) + "\n"


def check_server_address(credentials: Path, superlink: str) -> None:
    """Refuse a server address the sites could not verify: its host must be a name of the server certificate."""
    host, _ = parse_server_address(superlink)
    certificate = x509.load_pem_x509_certificate((credentials / SERVER_CERT).read_bytes())
    names = names_in_certificate(certificate)
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        host = host.lower()
    if host not in [name.lower() for name in names]:
        raise ConfigError(
            f"{host!r} is not a name of the server certificate ({', '.join(names)}), so no site could verify the "
            f"server at {superlink}; give one of those names, or issue a certificate for it with "
            f"'skin-fl-certs renew-server --out {credentials} --server-name {host}' (sites keep their files)."
        )


def site_config_toml(site: str, superlink: str, key_file: str) -> str:
    """The kit's site.toml: everything the coordinator knows; the site adds its dataset folder."""
    quoted = json.dumps  # a JSON string is a valid TOML basic string
    return "\n".join(
        [
            f"# skin-fl site config of {quoted(site)}, from the coordinator's start-up kit (skin-fl {installed_version()}).",
            "# Start the site with: skin-fl-client --config site.toml   (see README.txt beside this file)",
            "# Relative paths are taken from this file's folder; deploy/sites/example-site.toml explains every key.",
            f"site = {quoted(site)}",
            f"superlink = {quoted(superlink)}",
            f"ca-cert = {quoted(CA_CERT)}",
            f"site-key = {quoted(key_file)}",
            "threads = \"auto\"",
            "sites-on-host = 1",
            "",
            "[data]",
            "# The site's labelled images (HAM10000, ISIC 2019/2020 layout, or one sub-folder per class):",
            "# set dir before the first start, or give --data DIR to skin-fl-client.",
            "# dir = \"/srv/dermoscopy/skin-fl-export\"",
            "skip-bad = false",
            "",
        ]
    )


def kit_readme(site: str, superlink: str, stem: str, key_file: str) -> str:
    """What hospital IT does with the kit, step by step."""
    version = installed_version()
    files = [
        (CA_CERT, "the federation's CA certificate"),
        (key_file, "this site's node key: secret, readable by its owner only (mode 600)"),
        (SITE_CONFIG, "the site's settings, filled in but for its dataset folder"),
    ]
    width = max(len(name) for name, _ in files)
    return "\n".join(
        [
            f'skin-fl start-up kit of site "{site}"',
            f"written {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC by the coordinator (skin-fl {version})",
            "",
            f"Federation server: {superlink} (TLS, checked against ca.crt; this site signs in with its node key)",
            "",
            "Files",
            *(f"  {name:<{width}}  {what}" for name, what in files),
            "",
            "On the site machine, as the account that will run skin-fl-client",
            "  1. Make the kit's place: mkdir -p /etc/skin-fl (or any folder; adjust the paths below)",
            f"  2. Copy the kit there with its modes kept, never by e-mail or chat: scp -rp kits/{stem} HOST:/etc/skin-fl/",
            f"     or copy {stem}.tar.gz and unpack it: tar --no-same-owner -xzpf {stem}.tar.gz -C /etc/skin-fl",
            f"  3. Install skin-fl {version}, the coordinator's version: a run whose code differs from the site's is refused.",
            f"  4. Set [data] dir in {SITE_CONFIG} to the site's labelled images (or add --data DIR to the command below).",
            f"  5. Start: skin-fl-client --config /etc/skin-fl/{stem}/{SITE_CONFIG}",
            "     It checks the images, the CA and the key first and says what to fix, then connects and waits for runs.",
            "     Nothing but model weights and aggregate metrics leaves the site.",
            "",
        ]
    )


def _write_kit(credentials: Path, site: str, stem: str, superlink: str) -> list[WrittenFile]:
    key_path, _ = site_key_paths(site)
    key_file = Path(key_path).name
    kit = f"{KITS_DIR}/{stem}"
    make_private_dir(credentials / KITS_DIR)
    make_private_dir(credentials / kit)
    contents = {
        CA_CERT: ((credentials / CA_CERT).read_bytes(), False),
        key_file: ((credentials / key_path).read_bytes(), True),
        SITE_CONFIG: (site_config_toml(site, superlink, key_file).encode("utf-8"), False),
        KIT_README: (kit_readme(site, superlink, stem, key_file).encode("utf-8"), False),
    }
    written = [write_credential_file(credentials, f"{kit}/{name}", content, secret) for name, (content, secret) in contents.items()]
    written.append(write_credential_file(credentials, f"{kit}.tar.gz", _archive(stem, contents), secret=True))
    return written


def _archive(stem: str, contents: dict[str, tuple[bytes, bool]]) -> bytes:
    """A gzipped tar of the kit folder whose entries carry the files' modes (tar -xzpf keeps the key private)."""
    buffer = io.BytesIO()
    now = int(datetime.datetime.now(datetime.UTC).timestamp())
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        folder = tarfile.TarInfo(stem)
        folder.type, folder.mode, folder.mtime = tarfile.DIRTYPE, 0o700, now
        archive.addfile(folder)
        for name, (content, secret) in contents.items():
            entry = tarfile.TarInfo(f"{stem}/{name}")
            entry.size, entry.mode, entry.mtime = len(content), PRIVATE_MODE if secret else PUBLIC_MODE, now
            archive.addfile(entry, io.BytesIO(content))
    return buffer.getvalue()
