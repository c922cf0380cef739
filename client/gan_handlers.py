"""ClientApp handlers of the federated GAN: local GAN rounds, synthesis of a site's minority classes, augmented training split.

The GAN's own work lives in `client.gan_rounds`, imported when a GAN message arrives, so a
classifier round does not load the GAN stack.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from shared.config import RunConfig
from shared.data.cache import CachedImages
from shared.protocol import GAN_SYNTHESISE_ACTION, GAN_TRAIN_ACTION
from shared.site_names import safe_site_name

DEFAULT_SYNTHETIC_ROOT = Path.home() / ".cache" / "skin-fl" / "synthetic"


def synthetic_set_tag(run: RunConfig) -> str:
    """A short hash of the settings that decide a site's synthetic set (classes, preprocessing, GAN, seed).

    Where the generator came from (a file, a resumed round) is left out: the server's synthesis
    request and the classifier rounds of one run must name the same set.
    """
    stable = json.dumps(
        {
            "run": run.model_dump(mode="json", include={"classes", "preprocess", "seed"}),
            "gan": run.gan.model_dump(mode="json", exclude={"generator", "start_round"}),
        },
        sort_keys=True,
    )
    return hashlib.sha256(stable.encode()).hexdigest()[:12]


def synthetic_set_path(source, context: Context, site_name: str, run: RunConfig) -> Path:
    """Where a site keeps its synthetic set: beside the simulation manifest, or under the node's cache dir."""
    manifest = getattr(source, "manifest_path", None)
    if manifest is not None:
        root = Path(manifest).parent / "synthetic"
    else:
        cache_dir = dict(context.node_config).get("cache-dir")
        root = Path(str(cache_dir)) / "synthetic" if cache_dir else DEFAULT_SYNTHETIC_ROOT
    safe_site = safe_site_name(site_name)
    return root / safe_site / f"{synthetic_set_tag(run)}.npz"


def selection_report_path(synthetic_path: Path) -> Path:
    """The site-local selection report beside a synthetic set: per-class real, wanted and added counts, rejections, thresholds."""
    return synthetic_path.with_suffix(".selection.json")


def synthesis_reply_metrics(report: dict, *, private: bool) -> dict[str, int]:
    """The totals a site sends after synthesis (see the allow-list of `query.gan_synthesise` in shared/protocol).

    A private run sends only the number of synthetic images it added (the coordinator can
    tell it from the training counts anyway); a run without DP adds the candidate and
    rejection totals.
    """
    metrics = {"num-examples": sum(report["real"].values()), "synthetic-images": sum(report["added"].values())}
    if not private and "rejected" in report:
        metrics["candidates"] = int(report["candidates"])
        metrics.update({f"rejected-{reason.replace('_', '-')}": int(count) for reason, count in report["rejected"].items()})
    return metrics


def site_training_images(source, context: Context, site, run: RunConfig) -> CachedImages:
    """The site's training split, with its selected synthetic images when the run augments."""
    if not run.gan.augment:
        return site.images.select("train")
    from shared.gan.augmentation import add_synthetic_to_training, load_synthetic

    synthetic = load_synthetic(synthetic_set_path(source, context, site.name, run), run.classes)
    return add_synthetic_to_training(site.images, synthetic).select("train")


def register_gan_handlers(app: ClientApp, source) -> None:
    """Add the GAN training (train.gan) and synthesis (query.gan_synthesise) handlers to `app`."""

    @app.train(GAN_TRAIN_ACTION)
    def train_gan(message: Message, context: Context) -> Message:
        from client.gan_rounds import train_gan_round

        return train_gan_round(message, context, source)

    @app.query(GAN_SYNTHESISE_ACTION)
    def synthesise(message: Message, context: Context) -> Message:
        from client.gan_rounds import synthesise_for_message

        return synthesise_for_message(message, context, source)
