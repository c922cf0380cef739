"""ClientApp handlers of the federated GAN: local GAN rounds, synthesis of a site's minority classes, augmented training split."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.privacy_round import open_site_ledger
from shared.config import ModelConfig, RunConfig
from shared.data.cache import CachedImages
from shared.device import resolve_device
from shared.durable_files import write_json_atomically
from shared.gan.augmentation import add_synthetic_to_training, load_synthetic, save_synthetic, synthesise_for_site
from shared.gan.features import classifier_features
from shared.gan.models import build_gan, gan_to_arrays, load_gan_arrays
from shared.gan.quality import frechet_distance
from shared.gan.training import at_gan_resolution, generate, to_uint8_hwc, train_gan_locally
from shared.local_training import site_round_seed
from shared.models.classifier import build_classifier
from shared.privacy.accounting import RoundSchedule
from shared.privacy.gan_training import train_gan_privately
from shared.privacy.training import private_train_metrics
from shared.protocol import (
    FEATURE_CLASSES_KEY,
    FEATURE_MODEL_KEY,
    GAN_SYNTHESISE_ACTION,
    GAN_TRAIN_ACTION,
    QUALITY_KEY,
    ROUND_KEY,
    RUN_KEY,
)
from shared.weights import load_arrays_into

QUALITY_SAMPLES = 256
DEFAULT_SYNTHETIC_ROOT = Path.home() / ".cache" / "skin-fl" / "synthetic"


def _arrays_of(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def feature_model_from(message: Message) -> torch.nn.Module:
    """The classifier whose penultimate features the site measures and selects in (weights from the server)."""
    config = message.content["config"]
    model = build_classifier(ModelConfig(name=str(config[FEATURE_MODEL_KEY]), pretrained="none"), int(config[FEATURE_CLASSES_KEY]))
    load_arrays_into(model, _arrays_of(message.content["classifier"]))
    return model.eval()


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
    safe_site = re.sub(r"[^A-Za-z0-9_.-]+", "_", site_name).strip("_") or "site"
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
    synthetic = load_synthetic(synthetic_set_path(source, context, site.name, run), run.classes)
    return add_synthetic_to_training(site.images, synthetic).select("train")


def _site_seed(run: RunConfig, server_round: int, site_name: str) -> int:
    return site_round_seed(run.seed, server_round, site_name)


def _site_frechet_distance(generator, feature_model, train_images: CachedImages, run: RunConfig, seed: int) -> float:
    """Fréchet distance between up to QUALITY_SAMPLES real training images (at the GAN's resolution) and as many generated ones, same classes."""
    rows = np.random.default_rng(seed).permutation(len(train_images))[:QUALITY_SAMPLES]
    real = at_gan_resolution(np.asarray(train_images.images[np.sort(rows)]), generator.image_size)
    labels = train_images.labels[np.sort(rows)]
    fake = to_uint8_hwc(generate(generator, labels, seed=seed))
    size = run.preprocess.image_size
    return frechet_distance(
        classifier_features(feature_model, real, image_size=size), classifier_features(feature_model, fake, image_size=size)
    )


def register_gan_handlers(app: ClientApp, source) -> None:
    """Add the GAN training (train.gan) and synthesis (query.gan_synthesise) handlers to `app`."""

    @app.train(GAN_TRAIN_ACTION)
    def train_gan(message: Message, context: Context) -> Message:
        config = message.content["config"]
        run = RunConfig.model_validate_json(str(config[RUN_KEY]))
        server_round = int(config[ROUND_KEY])
        site = source.load(context, run)
        device = resolve_device(run.train.device)
        generator, discriminator = build_gan(run.gan, len(run.classes))
        load_gan_arrays(generator, discriminator, _arrays_of(message.content["arrays"]))
        train_images = site.images.select("train")
        seed = _site_seed(run, server_round, site.name)
        metrics = {}
        if run.privacy.local:
            ledger = open_site_ledger(source, context, message, site.name, run)
            result = train_gan_privately(
                generator, discriminator, train_images, run=run, ledger=ledger, server_round=server_round, device=device, seed=seed
            )
            metrics.update(private_train_metrics(result))
            metrics["epsilon-next-classifier-round"] = ledger.epsilon_after(RoundSchedule.for_site(run, len(train_images)))
        else:
            result = train_gan_locally(generator, discriminator, train_images, config=run.gan, device=device, seed=seed)
        metrics.update({
            "num-examples": len(train_images),
            "discriminator-loss": result.discriminator_loss,
            "generator-loss": result.generator_loss,
            "train-seconds": result.seconds,
        })
        # The Frechet distance summarises the site's real images (mean and covariance of their
        # features), which DP-SGD does not cover: it is not sent from a private run.
        if bool(config[QUALITY_KEY]) and not run.privacy.local:
            metrics["frechet-distance"] = _site_frechet_distance(generator, feature_model_from(message), train_images, run, seed)
        reply = RecordDict(
            {
                "arrays": ArrayRecord({name: Array(value) for name, value in gan_to_arrays(generator.cpu(), discriminator.cpu()).items()}),
                "metrics": MetricRecord(metrics),
                "site": ConfigRecord({"name": site.name, "precision": result.precision, "device": str(device)}),
            }
        )
        return Message(reply, reply_to=message)

    @app.query(GAN_SYNTHESISE_ACTION)
    def synthesise(message: Message, context: Context) -> Message:
        config = message.content["config"]
        run = RunConfig.model_validate_json(str(config[RUN_KEY]))
        site = source.load(context, run)
        generator, discriminator = build_gan(run.gan, len(run.classes))
        load_gan_arrays(generator, discriminator, _arrays_of(message.content["arrays"]))
        train_images = site.images.select("train")
        synthesis = synthesise_for_site(
            generator, discriminator, feature_model_from(message), train_images,
            config=run.gan, image_size=run.preprocess.image_size, seed=_site_seed(run, 0, site.name),
        )
        synthetic_path = synthetic_set_path(source, context, site.name, run)
        save_synthetic(synthetic_path, synthesis)
        report = synthesis.report()
        report["real"] = {name: int(count) for name, count in zip(run.classes, train_images.class_counts())}
        # Per-class counts and the real images' nearest-neighbour thresholds stay here, in the site's own report.
        write_json_atomically(selection_report_path(synthetic_path), report)
        reply = RecordDict(
            {
                "metrics": MetricRecord(synthesis_reply_metrics(report, private=run.privacy.local)),
                "site": ConfigRecord({"name": site.name}),
            }
        )
        return Message(reply, reply_to=message)
