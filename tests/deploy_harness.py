"""Real-process deployment on loopback for tests: skin-fl-rehearse's federation plus SuperNodes started by hand."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from client.task_runner import runner_command
from coordinator.certs import site_file_stem
from coordinator.rehearsal import VENV_BIN, LoopbackFederation, Site, free_port
from shared.protocol import FLOWER_OBJECT_TRANSFER_ENV

__all__ = ["FAST_RUN_CONFIG", "Deployment", "free_port", "node_config", "read_json"]

FAST_RUN_CONFIG = {
    "num-server-rounds": 2,
    "model": "test_resnet",
    "pretrained": "none",
    "image-size": 64,
    "batch-size": 8,
    "max-steps-per-epoch": 2,
    "amp": "off",
    "head-refit-steps": 0,
}
"""A run that exercises every part of a round in seconds: timm's 0.4M-parameter test ResNet (a message's weights
are 1.5 MB: moving resnet18's 45 MB through the SuperLink and nginx was most of a test round), tiny images,
random init, two steps per epoch (and no refit of the classification layer, whose queries the TLS run proves)."""


def node_config(site: Site) -> str:
    """A SuperNode's --node-config string for `site` (names with spaces stay one value), as skin-fl-client writes it."""
    return f'site="{site.name}" data-dir="{site.data_dir}" format="folder" cache-dir="{site.cache_dir}" threads={site.threads}'


@dataclass
class Deployment(LoopbackFederation):
    """A rehearsal federation whose tests also start SuperNodes directly, with any key, CA or runner."""

    task_runner: bool = True
    """SuperNodes run under skin-fl's task runner, as skin-fl-client starts them; False: Flower's own per-message processes."""

    def start_supernode(
        self, site: Site, *, key: Path | None = None, ca: Path | None = None, log_name: str | None = None,
        extra: tuple[str, ...] = (),
    ):
        """A real flower-supernode for `site` connecting through nginx's public port, under the site's task runner."""
        key = key if key is not None else self.credentials / "sites" / f"{site_file_stem(site.name)}.key"
        runtime_port = free_port()
        command = [
            str(VENV_BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.public_port}",
            "--auth-supernode-private-key", str(key), "--node-config", node_config(site),
            "--port", str(runtime_port), *extra,
        ]
        if ca is not None:
            command += ["--root-certificates", str(ca)]
        if self.task_runner:
            command = runner_command(command, runtime_port)
        # Each SuperNode installs the app it is sent into its own FLWR_HOME, not the user's ~/.flwr.
        flwr_home = self.root / "site-flwr-home" / site_file_stem(site.name)
        # Flower's own runner gets the same object transfer settings as skin-fl's (which sets them itself).
        environment = {"FLWR_HOME": str(flwr_home), **FLOWER_OBJECT_TRANSFER_ENV}
        return self._spawn(command, log_name or f"supernode-{site_file_stem(site.name)}.log", environment)


def read_json(path: Path) -> dict:
    """A JSON file's content."""
    return json.loads(Path(path).read_text())
