"""The nginx reverse proxy in front of the SuperLink: its config, rendered from the shipped template."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigError

TEMPLATE_PATH = Path(__file__).with_name("nginx_fleet_proxy.conf")
UPSTREAM_TLS_NAME = "localhost"
"""The name nginx checks in the SuperLink's certificate; skin-fl-certs always puts it there."""
_PLACEHOLDER = re.compile(r"@[A-Z_]+@")


@dataclass(frozen=True)
class ProxySettings:
    """Everything the nginx config needs: addresses, credential files and where nginx keeps its files."""

    listen: str
    superlink_address: str
    nginx_dir: Path
    server_cert: Path | None = None
    server_key: Path | None = None
    ca_cert: Path | None = None
    worker_user: str | None = None
    """Account nginx's workers run as when nginx starts as root ("user group"); None picks nobody."""

    @property
    def tls(self) -> bool:
        """Whether the proxy speaks TLS (to the sites and to the SuperLink)."""
        return self.server_cert is not None

    @property
    def config_path(self) -> Path:
        """Where the rendered config is written."""
        return self.nginx_dir / "nginx.conf"

    @property
    def pid_path(self) -> Path:
        """nginx's pid file."""
        return self.nginx_dir / "nginx.pid"

    @property
    def error_log_path(self) -> Path:
        """nginx's error log."""
        return self.nginx_dir / "logs" / "error.log"


def fleet_paths_in_template(template: str | None = None) -> list[str]:
    """The Fleet API endpoint names the template forwards (the rest of the SuperLink is refused)."""
    text = template if template is not None else TEMPLATE_PATH.read_text(encoding="utf-8")
    match = re.search(r'if \(\$request_uri !~ "\^/v1/fleet/\(([a-z|-]+)\)\$"\)', text)
    if match is None:
        raise ConfigError(f"{TEMPLATE_PATH} has no Fleet API location; restore it from deploy/nginx/.")
    return match.group(1).split("|")


def render_config(settings: ProxySettings, template: str | None = None) -> str:
    """The nginx config text for `settings`, from the template."""
    text = template if template is not None else TEMPLATE_PATH.read_text(encoding="utf-8")
    logs = settings.nginx_dir / "logs"
    values = {
        "@USER_DIRECTIVE@": f"user {settings.worker_user};" if settings.worker_user else _user_directive(),
        "@PID_FILE@": str(settings.pid_path),
        "@ERROR_LOG@": str(settings.error_log_path),
        "@ACCESS_LOG@": str(logs / "access.log"),
        "@TEMP_DIR@": str(settings.nginx_dir / "temp"),
        "@SUPERLINK_ADDRESS@": settings.superlink_address,
        "@LISTEN@": settings.listen,
        "@LISTEN_TLS@": " ssl" if settings.tls else "",
        "@UPSTREAM_SCHEME@": "https" if settings.tls else "http",
        "@TLS_SERVER_SETTINGS@": _tls_server_settings(settings),
        "@UPSTREAM_TLS_SETTINGS@": _upstream_tls_settings(settings),
    }
    if settings.worker_user is not None:
        _refuse_nginx_syntax(settings.worker_user.replace(" ", ""))
    for placeholder in ("@PID_FILE@", "@ERROR_LOG@", "@ACCESS_LOG@", "@TEMP_DIR@", "@SUPERLINK_ADDRESS@", "@LISTEN@"):
        _refuse_nginx_syntax(values[placeholder])
    for path in (settings.server_cert, settings.server_key, settings.ca_cert):
        if path is not None:
            _refuse_nginx_syntax(str(path))
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    leftover = sorted(set(_PLACEHOLDER.findall(text)))
    if leftover:
        raise ConfigError(f"the nginx template has unknown placeholders {leftover}; restore it from deploy/nginx/.")
    return text


def write_config(settings: ProxySettings) -> Path:
    """Render the config into the nginx folder, with its log and temp folders; returns its path."""
    for folder in (settings.nginx_dir, settings.nginx_dir / "logs", settings.nginx_dir / "temp"):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    settings.config_path.write_text(render_config(settings), encoding="utf-8")
    return settings.config_path


def find_nginx(explicit: str | None = None) -> str:
    """The nginx executable: the given path, or nginx on PATH or in /usr/sbin."""
    candidates = [explicit] if explicit else [shutil.which("nginx"), "/usr/sbin/nginx"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    if explicit:
        raise ConfigError(f"--nginx {explicit} is not an executable file; give the path of the nginx binary.")
    raise ConfigError(
        "nginx is not installed (not on PATH, not /usr/sbin/nginx); install it with "
        "'sudo apt-get install nginx' (Debian/Ubuntu) or pass --nginx /path/to/nginx."
    )


def nginx_command(nginx: str, settings: ProxySettings) -> list[str]:
    """The command that runs nginx in the foreground with the rendered config."""
    return [nginx, "-p", str(settings.nginx_dir), "-c", str(settings.config_path), "-e", "stderr", "-g", "daemon off;"]


def _refuse_nginx_syntax(value: str) -> None:
    if any(char in value for char in ";{}#\"' \n"):
        raise ConfigError(
            f"{value!r} cannot go into the nginx config (it holds a space, quote, ; {{ }} # or a line break); "
            "use a state folder and credential paths without those characters."
        )


def _user_directive() -> str:
    # Started as root, nginx switches its workers to an unprivileged account; as anyone else it
    # keeps the current user and the directive would only print a warning.
    if os.geteuid() != 0:
        return "# (not started as root: workers run as the current user)"
    for user, group in (("nobody", "nogroup"), ("nobody", "nobody")):
        try:
            pwd.getpwnam(user)
            grp.getgrnam(group)
        except KeyError:
            continue
        return f"user {user} {group};"
    return "# (no 'nobody' account: workers run as the current user)"


def _tls_server_settings(settings: ProxySettings) -> str:
    if not settings.tls:
        return "        # Development mode (--insecure): plain HTTP, no TLS."
    return "\n".join(
        [
            f"        ssl_certificate {settings.server_cert};",
            f"        ssl_certificate_key {settings.server_key};",
            # TLS 1.3 only: every suite is AEAD (no CBC-SHA1 of TLS 1.2); gRPC clients speak it.
            "        ssl_protocols TLSv1.3;",
            "        ssl_prefer_server_ciphers off;",
            "        ssl_session_cache shared:skin_fl_tls:1m;",
        ]
    )


def _upstream_tls_settings(settings: ProxySettings) -> str:
    if not settings.tls:
        return "            # Development mode (--insecure): the SuperLink speaks plain HTTP on loopback."
    return "\n".join(
        [
            "            # The SuperLink speaks TLS too; nginx checks its certificate against the federation CA.",
            f"            proxy_ssl_trusted_certificate {settings.ca_cert};",
            "            proxy_ssl_verify on;",
            "            proxy_ssl_verify_depth 2;",
            f"            proxy_ssl_name {UPSTREAM_TLS_NAME};",
            "            proxy_ssl_server_name on;",
            "            proxy_ssl_session_reuse on;",
        ]
    )
