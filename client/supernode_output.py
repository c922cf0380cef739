"""Plain-words explanations of what flower-supernode prints when it cannot join the federation."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Diagnosis:
    """One recognised SuperNode problem: what it means, what to do, and whether retrying can help."""

    kind: str
    message: str
    retry_helps: bool


@dataclass(frozen=True)
class ConnectionContext:
    """What the explanations name: the server address and the site's files."""

    site: str
    superlink: str
    ca_cert: Path | None
    site_key: Path | None


# Patterns from flwr 1.41's SuperNode output (exit codes 302/305, Fleet API error codes, ssl and
# socket errors). Order matters: the first match of a line wins.
_RULES: tuple[tuple[str, re.Pattern], ...] = (
    ("hostname-mismatch", re.compile(r"CERTIFICATE_VERIFY_FAILED.*(Hostname mismatch|IP address mismatch)", re.I)),
    ("certificate-expired", re.compile(r"CERTIFICATE_VERIFY_FAILED.*(certificate has expired|not yet valid)", re.I)),
    ("untrusted-server", re.compile(r"CERTIFICATE_VERIFY_FAILED", re.I)),
    ("plain-http-server", re.compile(r"WRONG_VERSION_NUMBER|record layer failure|packet length too long", re.I)),
    ("no-site-key", re.compile(r"\[code: 2001\]|All SuperNodes must be registered via the CLI")),
    ("key-refused", re.compile(r"\[code: 2004\]|Failed to activate SuperNode")),
    ("key-unreadable", re.compile(r"Exit Code: 302|Unable to parse the private key file")),
    ("name-unknown", re.compile(r"Name or service not known|Temporary failure in name resolution|nodename nor servname", re.I)),
    ("refused", re.compile(r"Connection refused", re.I)),
    ("timed-out", re.compile(r"timed out|ConnectTimeout|No route to host|Network is unreachable", re.I)),
    ("proxy-unavailable", re.compile(r"502 Bad Gateway|503 Service Unavailable|504 Gateway Time-out", re.I)),
    ("gave-up", re.compile(r"Giving up reconnection|Exit Code: 305")),
    ("retrying", re.compile(r"Connection attempt failed, retrying")),
)
_RETRYABLE = {"name-unknown", "refused", "timed-out", "proxy-unavailable", "gave-up", "key-refused", "retrying"}


def classify_line(line: str) -> str | None:
    """The kind of problem a SuperNode output line reports, or None for an ordinary line."""
    for kind, pattern in _RULES:
        if pattern.search(line):
            return kind
    return None


def explain(kind: str, context: ConnectionContext) -> Diagnosis:
    """The plain-words message for a problem kind: what happened and how to fix it."""
    host, _, port = context.superlink.rpartition(":")
    ca = context.ca_cert or "the CA file"
    key = context.site_key or "the site key"
    messages = {
        "untrusted-server": (
            f"the server at {context.superlink} presented a TLS certificate that {ca} does not vouch for: this is "
            "not the federation's CA certificate (or none was given). Ask the coordinator for the ca.crt from the "
            "folder skin-fl-certs wrote, pass it with --ca-cert, and check the address points at the skin-fl server."
        ),
        "hostname-mismatch": (
            f"the server certificate does not list the name {host!r}: connect with a name or IP the certificate was "
            "issued for, or ask the coordinator to issue one with 'skin-fl-certs init --server-name "
            f"{host}' (and send you the new ca.crt)."
        ),
        "certificate-expired": (
            "the server's TLS certificate has expired or is not valid yet: check this machine's clock, or ask the "
            "coordinator to issue new credentials with skin-fl-certs (--days sets their validity)."
        ),
        "plain-http-server": (
            f"the server at {context.superlink} does not speak TLS: it was started with --insecure, or the port is "
            "another service's. Ask the coordinator for the public port skin-fl-server prints at start."
        ),
        "no-site-key": (
            "the server requires node authentication and this SuperNode sent no site key: pass this site's private "
            "key with --site-key (sites/<site>.key from the coordinator)."
        ),
        "key-refused": (
            f"the server refused to activate site {context.site!r} with key {key}: either the key's public half is "
            "not registered on the server (ask the coordinator to add the site with 'skin-fl-certs add-site --site "
            "NAME' and restart skin-fl-server, and check that you use this site's own key file), or another "
            "SuperNode with the same key is connected right now (a second skin-fl-client for this site, or one "
            "stopped less than about a minute ago, which the server frees after missed heartbeats)."
        ),
        "key-unreadable": (
            f"the SuperNode could not read {key} as a private key: give the sites/<site>.key file written by "
            "skin-fl-certs, unchanged."
        ),
        "name-unknown": (
            f"the host name {host!r} cannot be resolved: check its spelling in --superlink, or this machine's DNS."
        ),
        "refused": (
            f"nothing accepts connections at {context.superlink}: the skin-fl server is not running yet, or the "
            f"port {port} is wrong (use the one skin-fl-server prints at start)."
        ),
        "timed-out": (
            f"no answer from {context.superlink}: a firewall drops the traffic, the machine is down, or the "
            f"address is wrong; ask the hospital network team to allow outgoing TCP to port {port}."
        ),
        "proxy-unavailable": (
            f"the server's proxy at {context.superlink} answers, but the federation server behind it does not: "
            "the coordinator's SuperLink is down or restarting."
        ),
        "gave-up": f"the SuperNode lost its connection to {context.superlink} and gave up retrying.",
        "retrying": (
            f"the connection to {context.superlink} failed; the SuperNode keeps retrying (the server may be "
            "restarting, or the network is down)."
        ),
    }
    return Diagnosis(kind, messages[kind], kind in _RETRYABLE)


class OutputWatcher:
    """Reads SuperNode output line by line and remembers the most telling problem it reported."""

    # A specific cause outranks the generic 'gave up' line that follows it.
    _GENERIC = {"gave-up", "retrying"}

    def __init__(self, context: ConnectionContext):
        self.context = context
        self.kinds_seen: list[str] = []
        self.connected = False

    def feed(self, line: str) -> Diagnosis | None:
        """Take one output line; returns a Diagnosis the first time a problem kind shows up."""
        if "Starting Flower ClientApp" in line or "Received:" in line or "Connection successful" in line:
            self.connected = True
        kind = classify_line(line)
        if kind is None or kind in self.kinds_seen:
            return None
        self.kinds_seen.append(kind)
        return explain(kind, self.context)

    def diagnosis(self) -> Diagnosis | None:
        """The most specific problem seen since the SuperNode started, if any."""
        specific = [kind for kind in self.kinds_seen if kind not in self._GENERIC]
        if specific:
            return explain(specific[-1], self.context)
        if self.kinds_seen:
            return explain(self.kinds_seen[-1], self.context)
        return None
