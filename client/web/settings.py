"""Settings of the clinician web app: models, site folder, network, accounts and upload limits."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import Field, ValidationError, field_validator, model_validator

from shared.config import StrictModel
from shared.errors import ConfigError
from shared.network import is_loopback

DEFAULT_PORT = 8765
DEFAULT_MALIGNANT_CLASSES = ("mel", "bcc", "akiec")
DATABASE_FILE = "cases.sqlite"
USERS_FILE = "users.json"
IMAGES_FOLDER = "images"


class WebSettings(StrictModel):
    """Everything `skin-fl-web` needs, read once from a TOML file and the command line."""

    models: list[Path] = Field(
        default_factory=list,
        description="Saved skin-fl model files (a run's final_model.pt); several form an ensemble that averages probabilities.",
    )
    data_dir: Path = Field(
        description="The web app's own folder at the site: uploaded images, the case database and, by default, the user list."
    )
    db_path: Path | None = Field(None, description=f"Case database (default <data-dir>/{DATABASE_FILE}).")
    users_file: Path | None = Field(None, description=f"Hashed user tokens written by add-user (default <data-dir>/{USERS_FILE}).")
    host: str = Field("127.0.0.1", description="Address to listen on; other than loopback only with TLS.")
    port: int = Field(DEFAULT_PORT, ge=1, le=65535, description="TCP port to listen on.")
    tls_certfile: Path | None = Field(None, description="PEM certificate for HTTPS (with tls_keyfile).")
    tls_keyfile: Path | None = Field(None, description="PEM private key for HTTPS (with tls_certfile).")
    max_upload_mb: float = Field(20.0, gt=0, le=500, description="Largest accepted image file, in MiB.")
    max_files: int = Field(20, ge=1, le=500, description="Most images in one classify request.")
    max_image_side: int = Field(10_000, ge=32, le=100_000, description="Longest accepted image side, in pixels.")
    max_image_megapixels: float = Field(
        40.0, gt=0, le=1000, description="Most pixels in one image, in millions (checked from the header, before decoding)."
    )
    max_request_megapixels: float = Field(200.0, gt=0, le=10_000, description="Most pixels of all images in one request, in millions.")
    malignant_classes: list[str] = Field(
        default_factory=lambda: list(DEFAULT_MALIGNANT_CLASSES),
        description="Classes whose prediction raises the malignancy flag (each must be a class of the model).",
    )
    malignant_threshold: float = Field(
        0.5, gt=0, le=1, description="The flag is also raised when the malignant classes' probabilities sum to at least this."
    )
    threads: int | None = Field(None, ge=1, le=256, description="torch CPU threads for inference (default: torch's choice).")
    device: str = Field("cpu", description="'cpu', 'cuda', 'cuda:N' or 'auto' for inference.")

    @field_validator("models")
    @classmethod
    def _model_files_exist(cls, value: list[Path]) -> list[Path]:
        resolved = []
        for path in value:
            path = Path(path).expanduser()
            if not path.is_file():
                raise ValueError(f"model file {path} does not exist; give a saved skin-fl model such as a run's final_model.pt")
            resolved.append(path.resolve())
        return resolved

    @field_validator("data_dir", "db_path", "users_file", "tls_certfile", "tls_keyfile")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return None if value is None else Path(value).expanduser().resolve()

    @model_validator(mode="after")
    def _network_is_safe(self) -> WebSettings:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("give both tls_certfile and tls_keyfile for HTTPS, or neither")
        for path in (self.tls_certfile, self.tls_keyfile):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} does not exist; give the site's PEM certificate and key")
        if self.tls_certfile is None and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} would serve patients' images over plain HTTP beyond this machine; keep host "
                "127.0.0.1 (behind the site's TLS reverse proxy), or give tls_certfile and tls_keyfile"
            )
        return self

    @property
    def database_path(self) -> Path:
        """The case database file."""
        return self.db_path or self.data_dir / DATABASE_FILE

    @property
    def users_path(self) -> Path:
        """The user list file."""
        return self.users_file or self.data_dir / USERS_FILE

    @property
    def images_dir(self) -> Path:
        """Where uploaded images are kept, under server-chosen names."""
        return self.data_dir / IMAGES_FOLDER

    @property
    def max_upload_bytes(self) -> int:
        """The per-file upload limit in bytes."""
        return int(self.max_upload_mb * 1024 * 1024)


PATH_KEYS = ("models", "data_dir", "db_path", "users_file", "tls_certfile", "tls_keyfile")


def load_web_settings(config_file: Path | None = None, **overrides) -> WebSettings:
    """Settings from a TOML file (kebab-case keys, paths relative to the file) overridden by non-None arguments."""
    values: dict = {}
    if config_file is not None:
        config_file = Path(config_file).expanduser()
        try:
            parsed = tomllib.loads(config_file.read_text(encoding="utf-8"))
        except OSError as error:
            raise ConfigError(f"cannot read the web app config {config_file} ({error.strerror}); give an existing TOML file") from error
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"{config_file} is not valid TOML ({error}); fix the line it names") from error
        base = config_file.resolve().parent
        for key, value in parsed.items():
            name = key.replace("-", "_")
            if name in PATH_KEYS:
                value = [base / Path(item).expanduser() for item in value] if name == "models" and isinstance(value, list) else (
                    base / Path(value).expanduser() if isinstance(value, str) else value
                )
            values[name] = value
    values.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return WebSettings.model_validate(values)
    except ValidationError as error:
        problems = "; ".join(_describe(problem) for problem in error.errors())
        where = f" in {config_file}" if config_file is not None else ""
        raise ConfigError(f"invalid web app settings{where}: {problems}") from error


def _describe(problem: dict) -> str:
    """One validation problem as `key: what is wrong`, with the fix for a missing key."""
    key = ".".join(str(part).replace("_", "-") for part in problem["loc"]) or "settings"
    if problem["type"] == "missing":
        return f"{key} is required: pass --{key} or set {key} in the TOML config"
    return f"{key}: {problem['msg'].removeprefix('Value error, ')}"
