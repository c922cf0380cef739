"""Where a site's images come from: the node config (a hospital) or a simulation manifest."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context

from shared.config import RunConfig
from shared.data.cache import CachedImages
from shared.data.readers import read_dataset
from shared.device import configure_cpu_threads
from shared.errors import ConfigError
from shared.site_data import load_table_csv, prepare_site_images

DEFAULT_CACHE_ROOT = Path.home() / ".cache" / "skin-fl" / "images"


@dataclass
class SiteImages:
    """A site's name and its cached images (all splits)."""

    name: str
    images: CachedImages


@dataclass
class NodeConfigSite:
    """A hospital site: `site`, `data-dir`, `format` (and optional `cache-dir`, `skip-bad`) in the node config."""

    _loaded: dict = field(default_factory=dict, repr=False)

    def load(self, context: Context, run: RunConfig) -> SiteImages:
        """Read, split and cache the site's dataset (reused while nothing changes)."""
        node = dict(context.node_config)
        missing = [key for key in ("site", "data-dir", "format") if key not in node]
        if missing:
            raise ConfigError(
                f"node config lacks {missing}; start the SuperNode with "
                "--node-config \"site='NAME' data-dir='/path/to/images' format='ham10000'\""
            )
        key = (node["site"], node["data-dir"], node["format"], run.preprocess.model_dump_json(), run.seed)
        if key not in self._loaded:
            table = read_dataset(Path(str(node["data-dir"])), str(node["format"]), skip_bad=bool(node.get("skip-bad", False)))
            images = prepare_site_images(
                table,
                site=str(node["site"]),
                classes=run.classes,
                split_fractions=run.split_fractions,
                seed=run.seed,
                cache_root=Path(str(node.get("cache-dir", DEFAULT_CACHE_ROOT))),
                preprocess=run.preprocess,
                skip_bad=bool(node.get("skip-bad", False)),
                progress=False,
            )
            self._loaded[key] = SiteImages(str(node["site"]), images)
        return self._loaded[key]


@dataclass
class SimulationSites:
    """Virtual sites of a simulation: `partition-id` indexes the sites of a manifest JSON file.

    The manifest lists, per site, its name and its split table CSV, plus the cache root and
    the CPU threads each virtual site may use.
    """

    manifest_path: Path
    _loaded: dict = field(default_factory=dict, repr=False)

    def load(self, context: Context, run: RunConfig) -> SiteImages:
        """The cached images of the site behind this virtual node."""
        manifest = json.loads(Path(self.manifest_path).read_text())
        partition = int(context.node_config["partition-id"])
        entry = manifest["sites"][partition]
        configure_cpu_threads(manifest.get("threads_per_site"))
        key = (entry["name"], run.preprocess.model_dump_json())
        if key not in self._loaded:
            table = load_table_csv(Path(entry["table_csv"]), run.classes)
            images = prepare_site_images(
                table,
                site=entry["name"],
                classes=run.classes,
                split_fractions=run.split_fractions,
                seed=run.seed,
                cache_root=Path(manifest["cache_root"]),
                preprocess=run.preprocess,
                progress=False,
            )
            self._loaded[key] = SiteImages(entry["name"], images)
        return self._loaded[key]
