"""Network addresses: host:port as sites write the server's, and which addresses reach this machine only."""

from __future__ import annotations

import ipaddress
import re

from shared.errors import ConfigError

_HOST_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"^{_HOST_LABEL}(\.{_HOST_LABEL})*$")


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_server_address(address: str) -> tuple[str, int]:
    """(host, port) of a host:port address, or an error saying how to write it."""
    example = "e.g. fl.hospital-network.org:9443, 10.0.0.5:9443 or [2001:db8::5]:9443"
    if "://" in address or "/" in address:
        raise ConfigError(f"server address {address!r} must be host:port without a scheme or path ({example}).")
    match = re.fullmatch(r"\[(?P<ipv6>[^\]\s]+)\]:(?P<port>\d{1,5})|(?P<host>[^:\[\]\s]+):(?P<port2>\d{1,5})", address)
    if match is None:
        raise ConfigError(f"server address {address!r} is not host:port ({example}); the port is the one skin-fl-server prints.")
    host = match.group("ipv6") or match.group("host")
    port = int(match.group("port") or match.group("port2"))
    if not 1 <= port <= 65535:
        raise ConfigError(f"port {port} in server address {address!r} is not between 1 and 65535.")
    if match.group("ipv6"):
        try:
            ipaddress.IPv6Address(host)
        except ValueError as error:
            raise ConfigError(f"{host!r} in server address {address!r} is not an IPv6 address ({example}).") from error
    elif not _HOST_NAME.fullmatch(host):
        raise ConfigError(f"{host!r} in server address {address!r} is not a valid host name or IPv4 address ({example}).")
    return host, port
