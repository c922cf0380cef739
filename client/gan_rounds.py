"""The work of the GAN messages at a site: a local (or DP) GAN round, and the synthesis of its minority classes."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.gan_handlers import selection_report_path, synthesis_reply_metrics, synthetic_set_path
from client.privacy_round import open_site_ledger
from shared.config import ModelConfig, RunConfig
from shared.data.cache import CachedImages
from shared.device import resolve_device
from shared.durable_files import write_json_atomically
from shared.gan.augmentation import save_synthetic, synthesise_for_site
from shared.gan.features import classifier_features
from shared.gan.models import build_gan, gan_to_arrays, load_gan_arrays
from shared.gan.quality import frechet_distance
from shared.gan.training import at_gan_resolution, generate, to_uint8_hwc, train_gan_locally
from shared.local_training import site_round_seed
from shared.models.classifier import build_classifier
from shared.privacy.accounting import RoundSchedule
from shared.privacy.gan_training import train_gan_privately
from shared.privacy.training import private_train_metrics
from shared.protocol import FEATURE_CLASSES_KEY, FEATURE_MODEL_KEY, QUALITY_KEY, ROUND_KEY, RUN_KEY
from shared.weights import load_arrays_into

QUALITY_SAMPLES = 256
"""Real and generated images a site compares for its Frechet distance."""


def _arrays_of(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def feature_model_from(message: Message) -> torch.nn.Module:
    """The classifier whose penultimate features the site measures and selects in (weights from the server)."""
    config = message.content["config"]
    model = build_classifier(ModelConfig(name=str(config[FEATURE_MODEL_KEY]), pretrained="none"), int(config[FEATURE_CLASSES_KEY]))
    load_arrays_into(model, _arrays_of(message.content["classifier"]))
    return model.eval()


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


def train_gan_round(message: Message, context: Context, source) -> Message:
    """A local GAN round on the site's training split (under DP-SGD when the run asks); the reply carries both networks."""
    config = message.content["config"]
    run = RunConfig.from_coordinator(str(config[RUN_KEY]))
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


def synthesise_for_message(message: Message, context: Context, source) -> Message:
    """Sample, select and keep the site's synthetic minority-class images; the reply carries totals only."""
    config = message.content["config"]
    run = RunConfig.from_coordinator(str(config[RUN_KEY]))
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
