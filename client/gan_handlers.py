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
from shared.site_names import safe_site_name

GAN_TRAIN_ACTION = "gan"
GAN_SYNTHESISE_ACTION = "gan_synthesise"
GAN_TRAIN_MESSAGE = f"train.{GAN_TRAIN_ACTION}"
GAN_SYNTHESISE_MESSAGE = f"query.{GAN_SYNTHESISE_ACTION}"
RUN_KEY = "run"
ROUND_KEY = "server-round"
QUALITY_KEY = "quality"
FEATURE_MODEL_KEY = "feature-model"
FEATURE_CLASSES_KEY = "feature-classes"
REPORT_KEY = "report"
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
