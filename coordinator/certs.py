"""`skin-fl-certs`: the federation's TLS certificate authority, server certificate and SuperNode keys."""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import shlex
import sys
import tempfile
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import ConfigError, SkinFLError
from shared.site_names import site_file_stem
from shared.version import add_version_option

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
SERVER_KEY = "server.key"
SERVER_CERT = "server.crt"
SITES_DIR = "sites"
README = "README.txt"
ALWAYS_SERVER_NAMES = ("localhost", "127.0.0.1")
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
# Certificates start slightly in the past so a site whose clock runs a little behind accepts them.
CLOCK_SKEW = datetime.timedelta(minutes=5)
CA_DAYS = 3650
"""Validity of the federation's CA: long, because every site holds its certificate; server certificates are renewed under it."""
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")


@dataclass(frozen=True)
class WrittenFile:
    """One file written by skin-fl-certs, relative to the output folder."""

    path: str


def init_credentials(
    out_dir: Path,
    server_names: Sequence[str],
    sites: Sequence[str],
    days: int = 365,
    force: bool = False,
    ca_days: int = CA_DAYS,
) -> list[WrittenFile]:
    """Create the CA, the server key and certificate, and one node key pair per site in `out_dir`.

    The CA lives `ca_days` (sites keep its certificate), the server certificate `days`
    (`renew_server` issues the next one from the same CA, so sites need no new files).
    """
    _check_days(days)
    if ca_days < days:
        raise ConfigError(f"--ca-days {ca_days} is shorter than --days {days}; the CA must outlive the server certificate it signs.")
    names = _certificate_names(server_names)
    site_names = _check_site_names(sites)
    if not site_names:
        raise ConfigError("No site given; name every hospital site with --site NAME (repeat --site for each).")
    planned = [CA_KEY, CA_CERT, SERVER_KEY, SERVER_CERT]
    planned += [path for site in site_names for path in site_key_paths(site)]
    _refuse_overwrite(out_dir, planned, force)
    for site in site_names:
        _refuse_other_site_same_file(out_dir, site)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _ca_certificate(ca_key, ca_days)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _server_certificate(server_key, names, ca_key, ca_cert, days)

    make_private_dir(out_dir)
    written = [
        write_credential_file(out_dir, CA_KEY, _pem_private_key(ca_key), secret=True),
        write_credential_file(out_dir, CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), secret=False),
        write_credential_file(out_dir, SERVER_KEY, _pem_private_key(server_key), secret=True),
        write_credential_file(out_dir, SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM), secret=False),
    ]
    for site in site_names:
        written += _write_site_keys(out_dir, site)
    written.append(_write_readme(out_dir))
    return written


def add_site(out_dir: Path, site: str, force: bool = False) -> list[WrittenFile]:
    """Add one site's node key pair to an existing credentials folder."""
    for required in (CA_CERT, SERVER_CERT):
        if not (out_dir / required).is_file():
            raise ConfigError(
                f"{out_dir / required} does not exist; create the credentials first with "
                f"'skin-fl-certs init --out {out_dir} --server-name HOST --site NAME'."
            )
    (site_name,) = _check_site_names([site])
    _refuse_overwrite(out_dir, site_key_paths(site_name), force)
    _refuse_other_site_same_file(out_dir, site_name)
    written = _write_site_keys(out_dir, site_name)
    written.append(_write_readme(out_dir))
    return written


def renew_server(out_dir: Path, days: int = 365, server_names: Sequence[str] | None = None) -> list[WrittenFile]:
    """A new server key and certificate from the folder's CA (same names unless given); sites keep their files."""
    _check_days(days)
    if not (out_dir / CA_KEY).is_file():
        raise ConfigError(
            f"{out_dir / CA_KEY} is not there; bring the CA key back from where it is kept offline (only it can sign "
            "a server certificate the sites trust), or create new credentials with 'skin-fl-certs init'."
        )
    ca_cert = x509.load_pem_x509_certificate((out_dir / CA_CERT).read_bytes())
    loaded = serialization.load_pem_private_key((out_dir / CA_KEY).read_bytes(), password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey) or loaded.public_key() != ca_cert.public_key():
        raise ConfigError(f"{out_dir / CA_KEY} is not the key of {out_dir / CA_CERT}; give the folder 'skin-fl-certs init' wrote.")
    if server_names:
        names = _certificate_names(server_names)
    else:
        old = x509.load_pem_x509_certificate((out_dir / SERVER_CERT).read_bytes())
        alternative = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [*alternative.get_values_for_type(x509.DNSName), *map(str, alternative.get_values_for_type(x509.IPAddress))]
    expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=days)
    if expires > ca_cert.not_valid_after_utc:
        raise ConfigError(
            f"the CA expires on {ca_cert.not_valid_after_utc:%Y-%m-%d}, before a {days}-day certificate would; give a "
            "shorter --days, or create new credentials with 'skin-fl-certs init' (sites then need the new ca.crt)."
        )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _server_certificate(server_key, names, loaded, ca_cert, days)
    return [
        write_credential_file(out_dir, SERVER_KEY, _pem_private_key(server_key), secret=True),
        write_credential_file(out_dir, SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM), secret=False),
    ]


def _check_days(days: int) -> None:
    if days < 1:
        raise ConfigError(f"--days {days} is not a validity period; give a number of days of 1 or more.")


def remove_site(out_dir: Path, site: str) -> list[Path]:
    """Delete one site's key pair from the credentials folder; returns the files removed.

    The coordinator keeps accepting the key until `skin-fl-server sync-site-keys` (or its next
    `start`) unregisters it.
    """
    public_key_path = out_dir / SITES_DIR / f"{site_file_stem(site)}.pub"
    known = [name for name, _ in registered_sites(out_dir)] if (out_dir / SITES_DIR).is_dir() else []
    if not public_key_path.is_file() or _site_name_from_public_key(public_key_path) != site:
        raise ConfigError(
            f"{out_dir} holds no key of site {site!r}; its sites are: {', '.join(repr(name) for name in known) or 'none'}"
        )
    removed = [out_dir / path for path in site_key_paths(site) if (out_dir / path).exists()]
    for path in removed:
        path.unlink()
    _write_readme(out_dir)
    return removed


def describe_credentials(out_dir: Path, written: Sequence[WrittenFile] = ()) -> str:
    """The listing of every credential file in `out_dir` and the machine it goes to."""

    def line(path: str, what: str) -> str:
        return f"  {path:<28} {what}"

    server_cert = x509.load_pem_x509_certificate((out_dir / SERVER_CERT).read_bytes())
    sites = registered_sites(out_dir)
    lines = [f"skin-fl credentials in {out_dir.resolve()}"]
    if written:
        lines.append(f"Written now: {', '.join(item.path for item in written)}")
    lines += [
        f"Server certificate names: {', '.join(names_in_certificate(server_cert))}",
        f"Certificates valid until {server_cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
        "",
        "Coordinator (runs skin-fl-server):",
        line(CA_CERT, "CA certificate"),
        line(SERVER_CERT, "server TLS certificate"),
        line(SERVER_KEY, "server TLS private key (secret)"),
    ]
    lines += [line(f"{SITES_DIR}/{stem}.pub", f'node public key of site "{site}"') for site, stem in sites]
    for site, stem in sites:
        lines += [
            "",
            f'Site "{site}" (runs skin-fl-client --site {_shell_word(site)}):',
            line(CA_CERT, "CA certificate"),
            line(f"{SITES_DIR}/{stem}.key", "node private key (secret)"),
        ]
    lines += [
        "",
        "Stays with whoever runs skin-fl-certs, kept offline, copied to no machine:",
        line(CA_KEY, "CA private key (secret): needed only to issue a new server certificate"),
        "",
        "Secret files are readable by their owner only (mode 0600); copy them with their mode kept",
        "(scp -p, install -m 600), never by e-mail or chat.",
    ]
    return "\n".join(lines) + "\n"


def registered_sites(out_dir: Path) -> list[tuple[str, str]]:
    """(site name, file stem) of every site key pair in `out_dir`, in file-name order."""
    sites = []
    for public_key_path in sorted((out_dir / SITES_DIR).glob("*.pub")):
        sites.append((_site_name_from_public_key(public_key_path), public_key_path.stem))
    return sites


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of skin-fl-certs."""
    parser = argparse.ArgumentParser(
        prog="skin-fl-certs",
        description="Create the TLS certificate authority, the coordinator's server certificate and one "
        "SuperNode authentication key pair per hospital site, and list which file goes to which machine.",
    )
    add_version_option(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="create a new credentials folder")
    init.add_argument("--out", type=Path, required=True, help="folder to write the credentials to")
    init.add_argument(
        "--server-name",
        action="append",
        required=True,
        help="host name or IP address the sites use to reach the coordinator (repeat for several); "
        "localhost and 127.0.0.1 are always added",
    )
    init.add_argument("--site", action="append", required=True, help="hospital site name (repeat for each site)")
    init.add_argument("--days", type=int, default=365, help="server certificate validity in days (default 365)")
    init.add_argument(
        "--ca-days", type=int, default=CA_DAYS, help=f"CA validity in days (default {CA_DAYS}; renew-server issues server certificates under it)"
    )
    init.add_argument("--force", action="store_true", help="replace files that already exist")
    add = commands.add_parser("add-site", help="add one site's key pair to an existing credentials folder")
    add.add_argument("--out", type=Path, required=True, help="the credentials folder made by 'init'")
    add.add_argument("--site", required=True, help="hospital site name")
    add.add_argument("--force", action="store_true", help="replace this site's key pair if it exists")
    renew = commands.add_parser(
        "renew-server", help="issue a new server key and certificate from the folder's CA (sites keep their files); restart the server"
    )
    renew.add_argument("--out", type=Path, required=True, help="the credentials folder made by 'init', with ca.key")
    renew.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    renew.add_argument(
        "--server-name", action="append", help="host names or addresses (default: those of the current certificate)"
    )
    kit = commands.add_parser(
        "kit",
        help="write each site's start-up kit (CA, node key, filled-in site.toml, README; folder and .tar.gz) under kits/",
    )
    kit.add_argument("--out", type=Path, required=True, help="the credentials folder made by 'init'")
    kit.add_argument(
        "--superlink", required=True, metavar="HOST:PORT",
        help="the server's public address as sites reach it (a name of server.crt; the port skin-fl-server start listens on)",
    )
    kit.add_argument("--site", action="append", help="site name (repeat; default: every site of the folder)")
    remove = commands.add_parser(
        "remove-site", help="delete one site's key pair (then 'skin-fl-server sync-site-keys' revokes it at the coordinator)"
    )
    remove.add_argument("--out", type=Path, required=True, help="the credentials folder made by 'init'")
    remove.add_argument("--site", required=True, help="hospital site name, as given to init or add-site")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of skin-fl-certs."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "init":
            written = init_credentials(args.out, args.server_name, args.site, args.days, args.force, args.ca_days)
        elif args.command == "renew-server":
            written = renew_server(args.out, args.days, args.server_name)
        elif args.command == "remove-site":
            removed = remove_site(args.out, args.site)
            print(
                f"removed the key pair of site {args.site!r} ({', '.join(path.name for path in removed)}). A running "
                f"coordinator accepts the key until it runs: skin-fl-server --state-dir STATE_DIR sync-site-keys "
                f"--credentials {args.out}   (its next 'start' does the same)"
            )
            return 0
        elif args.command == "kit":
            from coordinator.startup_kit import describe_kits, write_startup_kits

            written = write_startup_kits(args.out, args.superlink, args.site)
            print(describe_kits(args.out, written), end="")
            return 0
        else:
            written = add_site(args.out, args.site, args.force)
    except SkinFLError as error:
        print(f"skin-fl-certs: error: {error}", file=sys.stderr)
        return 2
    print(describe_credentials(args.out, written), end="")
    return 0


def _shell_word(text: str) -> str:
    # Double quotes read better than shlex's '"'"' for the common apostrophe in a site name.
    if shlex.quote(text) == text or any(char in text for char in '"$`\\!'):
        return shlex.quote(text)
    return f'"{text}"'


def _certificate_names(server_names: Sequence[str]) -> list[str]:
    names: list[str] = []
    for raw_name in [*server_names, *ALWAYS_SERVER_NAMES]:
        name = raw_name.strip()
        if _parse_ip(name) is None and not _HOSTNAME.match(name):
            raise ConfigError(
                f"--server-name {raw_name!r} is neither a host name nor an IP address; give the bare name "
                "the sites connect to, e.g. --server-name fl.hospital.org or --server-name 10.0.0.5 "
                "(no https://, no port)."
            )
        if name.lower() not in [existing.lower() for existing in names]:
            names.append(name)
    return names


def _parse_ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def _check_site_names(sites: Sequence[str]) -> list[str]:
    names: list[str] = []
    for raw_site in sites:
        site = raw_site.strip()
        if not site or any(unicodedata.category(char).startswith("C") for char in site):
            raise ConfigError(
                f"--site {raw_site!r} is not a usable site name; give a name of visible characters, "
                "e.g. --site \"St Mary's\"."
            )
        if site in names:
            raise ConfigError(f"Site {site!r} is named twice; give each --site once.")
        clash = [other for other in names if site_file_stem(other) == site_file_stem(site)]
        if clash:
            raise ConfigError(
                f"Sites {clash[0]!r} and {site!r} would share the key files {SITES_DIR}/{site_file_stem(site)}.*; "
                "rename one of them so they differ in letters or digits."
            )
        names.append(site)
    return names


def site_key_paths(site: str) -> list[str]:
    """The private and public node-key files of `site`, relative to the credentials folder."""
    stem = site_file_stem(site)
    return [f"{SITES_DIR}/{stem}.key", f"{SITES_DIR}/{stem}.pub"]


def _refuse_overwrite(out_dir: Path, paths: Sequence[str], force: bool) -> None:
    existing = [str(out_dir / path) for path in paths if (out_dir / path).exists()]
    if existing and not force:
        raise ConfigError(
            f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; nothing was written. "
            "Pass --force to replace them (sites then need their new files), or choose another --out folder."
        )


def _refuse_other_site_same_file(out_dir: Path, site: str) -> None:
    public_key_path = out_dir / SITES_DIR / f"{site_file_stem(site)}.pub"
    if public_key_path.is_file():
        owner = _site_name_from_public_key(public_key_path)
        if owner != site:
            raise ConfigError(
                f"{public_key_path} already holds the key of site {owner!r}, whose file name matches {site!r}; "
                "rename the new site so it differs in letters or digits."
            )


def _site_name_from_public_key(public_key_path: Path) -> str:
    # The public key's comment field carries the real site name, so listings survive file-name mangling.
    fields = public_key_path.read_text(encoding="utf-8").strip().split(" ", 2)
    return fields[2] if len(fields) == 3 else public_key_path.stem


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "skin-fl federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return builder.not_valid_before(now - CLOCK_SKEW).not_valid_after(now + datetime.timedelta(days=days))


def _ca_certificate(ca_key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    public_key = ca_key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name("skin-fl federation CA"))
        .issuer_name(_name("skin-fl federation CA"))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    return _validity(builder, days).sign(ca_key, hashes.SHA384())


def _server_certificate(
    server_key: ec.EllipticCurvePrivateKey,
    names: Sequence[str],
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    days: int,
) -> x509.Certificate:
    alternative_names: list[x509.GeneralName] = []
    for name in names:
        address = _parse_ip(name)
        alternative_names.append(x509.IPAddress(address) if address is not None else x509.DNSName(name))
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    return _validity(builder, days).sign(ca_key, hashes.SHA384())


def names_in_certificate(certificate: x509.Certificate) -> list[str]:
    """The host names and addresses a server certificate is valid for."""
    alternative_names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(name.value) for name in alternative_names]


def _pem_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_site_keys(out_dir: Path, site: str) -> list[WrittenFile]:
    # flower-supernode reads its key with load_ssh_private_key and `flwr supernode register` reads
    # the public key with load_ssh_public_key, on a NIST curve: so both are OpenSSH-format P-384 keys.
    node_key = ec.generate_private_key(ec.SECP384R1())
    private_bytes = node_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public_bytes = node_key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    key_path, public_path = site_key_paths(site)
    make_private_dir(out_dir / SITES_DIR)
    return [
        write_credential_file(out_dir, key_path, private_bytes, secret=True),
        write_credential_file(out_dir, public_path, public_bytes + b" " + site.encode("utf-8") + b"\n", secret=False),
    ]


def _write_readme(out_dir: Path) -> WrittenFile:
    # The listing is rebuilt from the files on disk, so it always names every site, old and new.
    return write_credential_file(out_dir, README, describe_credentials(out_dir).encode("utf-8"), secret=False)


def make_private_dir(path: Path) -> None:
    """Create `path` (and its parents) readable by its owner only."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def write_credential_file(out_dir: Path, relative_path: str, content: bytes, secret: bool) -> WrittenFile:
    """Write a file through a temporary file created with its final mode, then move it into place."""
    target = out_dir / relative_path
    mode = PRIVATE_MODE if secret else PUBLIC_MODE
    descriptor, temporary_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        # mkstemp creates the file 0600, so a secret is never readable by others, even for a moment;
        # fchmod sets the exact final mode whatever the umask.
        os.fchmod(descriptor, mode)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary_name, target)
    except BaseException:
        Path(temporary_name).unlink(missing_ok=True)
        raise
    return WrittenFile(relative_path)


if __name__ == "__main__":
    sys.exit(main())
