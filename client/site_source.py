"""Where a site's images come from: the node config (a hospital) or a simulation manifest."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context

from shared.config import RunConfig
from shared.data.cache import CachedImages
from shared.data.feedback import FeedbackImages, prepare_feedback_images
from shared.data.readers import read_dataset
from shared.device import configure_cpu_threads
from shared.errors import ConfigError
from shared.site_data import load_table_csv, prepare_site_images
from shared.site_names import safe_site_name

DEFAULT_CACHE_ROOT = Path.home() / ".cache" / "skin-fl" / "images"
DEFAULT_PRIVACY_ROOT = Path.home() / ".local" / "state" / "skin-fl" / "privacy"
"""Where a site keeps its DP-SGD privacy ledgers unless the node config names `privacy-dir`."""
FEATURES_FOLDER = "_frozen-features"
"""Folder of cached frozen-network features inside a cache root (no site's cache folder name starts with '_')."""


@dataclass
class SiteImages:
    """A site's name, its cached images (all splits) and, when enabled, its clinicians' feedback cases."""

    name: str
    images: CachedImages
    feedback: FeedbackImages | None = None


def attach_feedback(
    site: SiteImages, store_path, *, run_id, run: RunConfig, cache_root: Path, skip_bad: bool, memo: dict
) -> SiteImages:
    """The site with the feedback store's labelled cases as extra training data, read once per run."""
    if not store_path:
        return site
    key = (run_id, site.name, str(store_path), run.preprocess.model_dump_json())
    if key not in memo:
        # Read once per run, so a case labelled while the run is going joins the next run, not mid-run.
        memo[key] = prepare_feedback_images(
            Path(str(store_path)), site=site.name, site_images=site.images, preprocess=run.preprocess,
            cache_root=cache_root, skip_bad=skip_bad,
        )
    return SiteImages(site.name, site.images, memo[key])


@dataclass
class NodeConfigSite:
    """A hospital site: `site`, `data-dir`, `format` (and optional `cache-dir`, `skip-bad`, `feedback-store`, `threads`) in the node config.

    `feedback-store` names the web app's cases.sqlite: its confirmed and corrected cases join the
    site's training split. `threads` caps torch's CPU threads (skin-fl-client writes it, sharing
    the machine's CPUs among the sites on it); without it torch uses every core.
    """

    _loaded: dict = field(default_factory=dict, repr=False)
    _feedback: dict = field(default_factory=dict, repr=False)

    def load(self, context: Context, run: RunConfig) -> SiteImages:
        """Read, split and cache the site's dataset (reused while nothing changes)."""
        node = dict(context.node_config)
        missing = [key for key in ("site", "data-dir", "format") if key not in node]
        if missing:
            raise ConfigError(
                f"node config lacks {missing}; start the SuperNode with "
                "--node-config \"site='NAME' data-dir='/path/to/images' format='ham10000'\""
            )
        if "threads" in node:
            if isinstance(node["threads"], bool) or not isinstance(node["threads"], int):
                raise ConfigError(f"node config threads={node['threads']!r} is not a thread count; give a positive whole number")
            configure_cpu_threads(node["threads"])
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
        return attach_feedback(
            self._loaded[key], node.get("feedback-store"), run_id=context.run_id, run=run,
            cache_root=Path(str(node.get("cache-dir", DEFAULT_CACHE_ROOT))), skip_bad=bool(node.get("skip-bad", False)),
            memo=self._feedback,
        )

    def feature_cache_dir(self, context: Context) -> Path:
        """Where the site keeps features of its images under a frozen network: FEATURES_FOLDER in its image cache folder."""
        return Path(str(context.node_config.get("cache-dir", DEFAULT_CACHE_ROOT))) / FEATURES_FOLDER

    def privacy_state_dir(self, context: Context) -> Path:
        """The site-local folder of its privacy ledgers: node config `privacy-dir`, else DEFAULT_PRIVACY_ROOT."""
        return Path(str(context.node_config.get("privacy-dir", DEFAULT_PRIVACY_ROOT))).expanduser()


@dataclass
class SimulationSites:
    """Virtual sites of a simulation: `partition-id` indexes the sites of a manifest JSON file.

    The manifest lists, per site, its name and its split table CSV, plus the cache root and
    the CPU threads each virtual site may use; a site's optional `feedback_store` adds its
    clinicians' labelled cases to its training split.
    """

    manifest_path: Path
    _loaded: dict = field(default_factory=dict, repr=False)
    _feedback: dict = field(default_factory=dict, repr=False)

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
        return attach_feedback(
            self._loaded[key], entry.get("feedback_store"), run_id=context.run_id, run=run,
            cache_root=Path(manifest["cache_root"]), skip_bad=False, memo=self._feedback,
        )

    def feature_cache_dir(self, context: Context) -> Path:
        """Where the virtual sites keep features of their images under a frozen network (one folder per site)."""
        manifest = json.loads(Path(self.manifest_path).read_text())
        partition = int(context.node_config["partition-id"])
        return Path(manifest["cache_root"]) / FEATURES_FOLDER / safe_site_name(manifest["sites"][partition]["name"])

    def privacy_state_dir(self, context: Context) -> Path:
        """The virtual sites' privacy ledgers: beside the manifest, in the simulation's run folder."""
        return Path(self.manifest_path).parent / "privacy"
