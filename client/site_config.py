"""A hospital site's settings for skin-fl-client, and the local checks run before it connects."""

from __future__ import annotations

import json
import stat
import tomllib
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from pydantic import ConfigDict, Field, ValidationError, field_validator

from shared.config import DATA_FORMATS, StrictModel
from shared.errors import ConfigError
from shared.privacy.site_policy import SitePrivacyPolicy

DEFAULT_SUPERNODE_PORT = 9094
"""Flower's default port of the SuperNode's local runtime API; two sites on one machine need two."""


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class SiteFileModel(StrictModel):
    """Settings read from a site TOML file: kebab-case keys, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", alias_generator=_kebab, populate_by_name=True)


class DataSettings(SiteFileModel):
    """Where the site's labelled images are and how to read them."""

    dir: Path = Field(description="Folder of the site's dataset (HAM10000, ISIC 2019/2020 layout or one folder per class).")
    format: str | None = Field(None, description="ham10000, isic2019, isic2020 or folder; recognised from the files when left out.")
    skip_bad: bool = Field(False, description="Leave out unreadable images and unknown labels instead of stopping.")
    cache_dir: Path | None = Field(None, description="Where decoded images are cached (default ~/.cache/skin-fl/images).")
    feedback_store: Path | None = Field(None, description="The clinician web app's cases.sqlite, whose labelled cases join training.")

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        if value is not None and value not in DATA_FORMATS[:4]:
            raise ValueError(f"data format {value!r} is not one of {', '.join(DATA_FORMATS[:4])}")
        return value


class ReconnectSettings(SiteFileModel):
    """How long to keep trying when the server cannot be reached."""

    supernode_wait_s: float = Field(
        300.0, gt=0, description="Seconds the SuperNode itself keeps retrying a lost connection before it is restarted."
    )
    first_backoff_s: float = Field(5.0, gt=0, description="Pause before the first restart; it doubles after each failed start.")
    max_backoff_s: float = Field(300.0, gt=0, description="Longest pause between restarts.")
    max_restarts: int = Field(0, ge=0, description="Give up after this many restarts in a row (0: never give up).")


class SiteSettings(SiteFileModel):
    """Everything skin-fl-client needs to join the federation for one hospital site."""

    site: str = Field(min_length=1, max_length=200, description="The site's name as the coordinator registered it (spaces allowed).")
    superlink: str = Field(description="The federation server's public address as host:port (no https://).")
    ca_cert: Path | None = Field(None, description="The federation's CA certificate (ca.crt from the coordinator).")
    site_key: Path | None = Field(None, description="This site's node private key (sites/<site>.key from the coordinator).")
    insecure: bool = Field(False, description="Local development only: no TLS and no node key.")
    data: DataSettings
    supernode_port: int = Field(
        DEFAULT_SUPERNODE_PORT, ge=1, le=65535, description="Local port of the SuperNode's runtime API (differs per site on one machine)."
    )
    state_dir: Path | None = Field(None, description="Where the client keeps its node config and log (default ~/.local/state/skin-fl-client/<site>).")
    threads: int | Literal["auto"] = Field(
        "auto", description="Torch CPU threads of the site's training and evaluation; auto: the machine's CPUs divided by sites-on-host."
    )
    sites_on_host: int = Field(1, ge=1, description="skin-fl sites (SuperNodes) sharing this machine, so threads = auto shares the CPUs out.")
    reconnect: ReconnectSettings = Field(default_factory=ReconnectSettings)
    privacy: SitePrivacyPolicy = Field(
        default_factory=SitePrivacyPolicy, description="The site's own privacy policy (maximum epsilon, required privacy mode)."
    )

    @field_validator("threads")
    @classmethod
    def _positive_threads(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"threads = {value} is not a thread count; give a positive number or \"auto\"")
        return value

    def cpu_threads(self) -> int:
        """The torch thread count the site's ClientApp sets before it trains: `threads`, or the CPUs shared out."""
        from shared.device import cpu_threads_per_process

        return self.threads if isinstance(self.threads, int) else cpu_threads_per_process(self.sites_on_host)

    @field_validator("site")
    @classmethod
    def _printable_name(cls, value: str) -> str:
        if value != value.strip() or any(not character.isprintable() for character in value):
            raise ValueError(f"site name {value!r} has leading/trailing spaces or control characters; write it as registered")
        return value


def read_site_file(path: Path) -> dict:
    """The raw settings of a site TOML file, or an error naming the line to fix."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"site config file {path} does not exist; start from deploy/sites/example-site.toml.")
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is not valid TOML ({error}); compare it with deploy/sites/example-site.toml.") from error
    return _paths_relative_to(values, path.resolve().parent)


FILE_PATH_KEYS = ("ca-cert", "site-key", "state-dir", "data.dir", "data.cache-dir", "data.feedback-store")
"""Keys of a site file that name files or folders; a relative one is taken from the file's own folder."""


def _paths_relative_to(values: dict, folder: Path) -> dict:
    """`values` with every relative path of FILE_PATH_KEYS made absolute from `folder` (as a start-up kit's site.toml needs)."""
    for key in FILE_PATH_KEYS:
        *parents, name = key.split(".")
        table = values
        for parent in parents:
            table = table.get(parent) if isinstance(table, dict) else None
        if not isinstance(table, dict) or not isinstance(table.get(name), str) or not table[name]:
            continue
        value = Path(table[name])
        if not value.is_absolute() and not table[name].startswith("~"):
            table[name] = str(folder / value)
    return values


def build_site_settings(file_values: dict, overrides: dict, source: str) -> SiteSettings:
    """Validated settings: the site file's values with command-line values on top (both kebab-case)."""
    merged = json.loads(json.dumps(file_values, default=str))
    for key, value in overrides.items():
        if value is None:
            continue
        if key.startswith("data."):
            merged.setdefault("data", {})[key.removeprefix("data.")] = value
        else:
            merged[key] = value
    try:
        return SiteSettings.model_validate(merged)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in error.errors(include_url=False)
        )
        raise ConfigError(
            f"site settings from {source} are incomplete or invalid: {problems}. Give them in the site config file "
            "(see deploy/sites/example-site.toml) or as options (skin-fl-client --help)."
        ) from error


def check_ca_certificate(path: Path | None) -> Path:
    """The CA file, checked to exist and hold a CA certificate."""
    ask = "ask the coordinator for the federation's ca.crt (from the folder skin-fl-certs wrote) and pass it with --ca-cert"
    if path is None:
        raise ConfigError(f"no CA certificate given; {ask}.")
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"CA certificate {path} does not exist; {ask}.")
    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as error:
        raise ConfigError(f"{path} is not a PEM certificate ({error}); {ask}.") from error
    try:
        is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ConfigError(f"{path} is a certificate but not a CA certificate (server.crt instead of ca.crt?); {ask}.")
    return path


def check_site_key(path: Path | None, site: str) -> Path:
    """The site's node private key, checked to exist, be private to its owner and be an EC key."""
    ask = f"ask the coordinator for the node key of site {site!r} (sites/<site>.key written by skin-fl-certs) and pass it with --site-key"
    if path is None:
        raise ConfigError(f"no site key given; {ask}.")
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"site key {path} does not exist; {ask}.")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"site key {path} can be read by other users (mode {mode:o}); it is this site's secret. "
            f"Make it private with: chmod 600 {path}"
        )
    if path.suffix == ".pub":
        raise ConfigError(f"{path} is the public half of the key; give the private key file (same name, ending in .key).")
    try:
        key = load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{path} is not an unencrypted OpenSSH private key ({error}); {ask}.") from error
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} is not an elliptic-curve key, which Flower's node authentication needs; {ask}.")
    return path


def resolve_state_dir(settings: SiteSettings) -> Path:
    """Where this site's node config and SuperNode log live."""
    from shared.site_names import site_file_stem

    if settings.state_dir is not None:
        return Path(settings.state_dir).expanduser().resolve()
    return (Path.home() / ".local" / "state" / "skin-fl-client" / site_file_stem(settings.site)).resolve()


def toml_string(text: str) -> str:
    """A TOML basic string holding `text` exactly (quotes, backslashes, accents and spaces included)."""
    # JSON string escapes are valid TOML escapes; DEL must be escaped in TOML but not in JSON.
    return json.dumps(text, ensure_ascii=True).replace("\x7f", "\\u007f")


def _toml_value(value: str | bool | int | float) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return repr(float(value)) if isinstance(value, float) else toml_string(value)


def node_config_toml(settings: SiteSettings, data_format: str) -> str:
    """The SuperNode's node config as TOML: what the ClientApp reads (site, data-dir, format, ...)."""
    data = settings.data
    values: dict[str, str | bool | int | float] = {
        "site": settings.site,
        "data-dir": str(Path(data.dir).expanduser().resolve()),
        "format": data_format,
        "skip-bad": data.skip_bad,
        "threads": settings.cpu_threads(),
    }
    if data.cache_dir is not None:
        values["cache-dir"] = str(Path(data.cache_dir).expanduser().resolve())
    if data.feedback_store is not None:
        values["feedback-store"] = str(Path(data.feedback_store).expanduser().resolve())
    values.update(settings.privacy.node_config())
    lines = ["# Written by skin-fl-client: the node config the SuperNode hands to the skin-fl ClientApp."]
    lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"
