"""Site answers to the server's questions: calibration likelihoods, soft confusion, head gradients and BatchNorm statistics of a global model, class counts."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.received import receive, round_training_images, training_images_of
from shared.batch_norm import measure_batch_norm_statistics
from shared.calibration import TEMPERATURES, summed_negative_log_likelihoods
from shared.config import RoundInstructions
from shared.errors import ConfigError
from shared.local_training import logits_on_images, precision_for
from shared.prior_correction import soft_confusion
from shared.protocol import (
    BATCH_NORM_ACTION,
    CALIBRATE_ACTION,
    CLASS_COUNTS_ACTION,
    CLASS_COUNTS_KEY,
    HEAD_GRADIENT_ACTION,
    HEAD_GRADIENT_RECORD,
    HEAD_IMAGE_WEIGHT_KEY,
    HEAD_LOSS_KEY,
    INSTRUCTIONS_KEY,
    NEGATIVE_LOG_LIKELIHOODS_KEY,
    PRIOR_ACTION,
    SOFT_CONFUSION_KEY,
    VALIDATION_CONFUSION_KEY,
)
from shared.top_refit import site_refit_gradient


def _validation_logits(message: Message, context: Context, source) -> tuple:
    """The run, the site, its validation image count, and the sent model's logits and labels on them (None without any)."""
    _, run, site, device, model, _ = receive(message, context, source).unpack()
    val_images = site.images.select("val")
    if not len(val_images):
        return run, site, 0, None
    precision = precision_for(model, run.train, device, run.preprocess.image_size)
    scored = logits_on_images(model, val_images, batch_size=run.train.batch_size * 2, device=device, precision=precision)
    return run, site, len(val_images), scored


def _reply(message: Message, site, metrics: dict, **arrays: ArrayRecord) -> Message:
    """The reply to `message`: the metrics, the site's name and any array records."""
    return Message(
        RecordDict({**arrays, "metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.name})}), reply_to=message
    )


def register_model_queries(app: ClientApp, source) -> None:
    """Add the calibration, prior-correction, head-refit, BatchNorm-statistics and class-count query handlers to `app`."""

    @app.query(CALIBRATE_ACTION)
    def calibrate(message: Message, context: Context) -> Message:
        _, site, count, scored = _validation_logits(message, context, source)
        sums = summed_negative_log_likelihoods(*scored).tolist() if scored is not None else [0.0] * len(TEMPERATURES)
        return _reply(message, site, {"num-examples": count, NEGATIVE_LOG_LIKELIHOODS_KEY: sums})

    @app.query(PRIOR_ACTION)
    def prior(message: Message, context: Context) -> Message:
        run, site, count, scored = _validation_logits(message, context, source)
        sums = soft_confusion(*scored).ravel().tolist() if scored is not None else [0.0] * len(run.classes) ** 2
        return _reply(message, site, {"num-examples": count, SOFT_CONFUSION_KEY: sums})

    @app.query(HEAD_GRADIENT_ACTION)
    def head_gradient(message: Message, context: Context) -> Message:
        received = receive(message, context, source)
        instructions, run, site, device, model, _ = received.unpack()
        if run.privacy.mode != "off":
            raise ConfigError("a head-refit gradient is not accounted by the privacy budget; this site sends none in a private run")
        train_images, _ = round_training_images(received, source, context)
        answer = site_refit_gradient(run.federation.refit_layers)(
            model, train_images, site.images.select("val"), instructions.federation_class_counts,
            device=device, precision=precision_for(model, run.train, device, run.preprocess.image_size),
            cache_dir=source.feature_cache_dir(context),
        )
        return _reply(
            message, site,
            {
                "num-examples": len(train_images), HEAD_LOSS_KEY: answer.loss, HEAD_IMAGE_WEIGHT_KEY: answer.image_weight,
                VALIDATION_CONFUSION_KEY: answer.validation_confusion,
            },
            **{HEAD_GRADIENT_RECORD: ArrayRecord({name: Array(value) for name, value in answer.gradient.items()})},
        )

    @app.query(BATCH_NORM_ACTION)
    def batch_norm_statistics(message: Message, context: Context) -> Message:
        received = receive(message, context, source)
        _, run, site, device, model, _ = received.unpack()
        train_images, _ = round_training_images(received, source, context)
        precision = precision_for(model, run.train, device, run.preprocess.image_size)
        statistics = measure_batch_norm_statistics(
            model, train_images, batch_size=run.train.batch_size * 2, device=device, precision=precision
        )
        return _reply(
            message, site, {"num-examples": len(train_images)},
            statistics=ArrayRecord({name: Array(value) for name, value in statistics.items()}),
        )

    @app.query(CLASS_COUNTS_ACTION)
    def class_counts(message: Message, context: Context) -> Message:
        run = RoundInstructions.from_coordinator(message.content["config"][INSTRUCTIONS_KEY]).run
        site = source.load(context, run)
        train_images, _ = training_images_of(site, run, source, context)
        counts = [int(count) for count in train_images.class_counts()]
        return _reply(message, site, {"num-examples": len(train_images), CLASS_COUNTS_KEY: counts})
