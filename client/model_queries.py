"""Site answers to the server's questions: calibration likelihoods, soft confusion and BatchNorm statistics of a global model, class counts."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.received import receive, round_training_images, training_images_of
from shared.batch_norm import measure_batch_norm_statistics
from shared.calibration import TEMPERATURES, summed_negative_log_likelihoods
from shared.local_training import logits_on_images, precision_for
from shared.prior_correction import soft_confusion
from shared.config import RoundInstructions
from shared.protocol import (
    BATCH_NORM_ACTION,
    CALIBRATE_ACTION,
    CLASS_COUNTS_ACTION,
    CLASS_COUNTS_KEY,
    INSTRUCTIONS_KEY,
    NEGATIVE_LOG_LIKELIHOODS_KEY,
    PRIOR_ACTION,
    SOFT_CONFUSION_KEY,
)


def register_model_queries(app: ClientApp, source) -> None:
    """Add the calibration, prior-correction, BatchNorm-statistics and class-count query handlers to `app`."""

    @app.query(CALIBRATE_ACTION)
    def calibrate(message: Message, context: Context) -> Message:
        _, run, site, device, model, _ = receive(message, context, source).unpack()
        val_images = site.images.select("val")
        sums = [0.0] * len(TEMPERATURES)
        if len(val_images):
            precision = precision_for(model, run.train, device, run.preprocess.image_size)
            logits, labels = logits_on_images(model, val_images, batch_size=run.train.batch_size * 2, device=device, precision=precision)
            sums = summed_negative_log_likelihoods(logits, labels).tolist()
        reply = RecordDict(
            {
                "metrics": MetricRecord({"num-examples": len(val_images), NEGATIVE_LOG_LIKELIHOODS_KEY: sums}),
                "site": ConfigRecord({"name": site.name}),
            }
        )
        return Message(reply, reply_to=message)

    @app.query(PRIOR_ACTION)
    def prior(message: Message, context: Context) -> Message:
        _, run, site, device, model, _ = receive(message, context, source).unpack()
        val_images = site.images.select("val")
        sums = [0.0] * (len(run.classes) ** 2)
        if len(val_images):
            precision = precision_for(model, run.train, device, run.preprocess.image_size)
            logits, labels = logits_on_images(model, val_images, batch_size=run.train.batch_size * 2, device=device, precision=precision)
            sums = [float(value) for value in soft_confusion(logits, labels).ravel()]
        reply = RecordDict(
            {
                "metrics": MetricRecord({"num-examples": len(val_images), SOFT_CONFUSION_KEY: sums}),
                "site": ConfigRecord({"name": site.name}),
            }
        )
        return Message(reply, reply_to=message)

    @app.query(BATCH_NORM_ACTION)
    def batch_norm_statistics(message: Message, context: Context) -> Message:
        received = receive(message, context, source)
        _, run, site, device, model, _ = received.unpack()
        train_images, _ = round_training_images(received, source, context)
        precision = precision_for(model, run.train, device, run.preprocess.image_size)
        statistics = measure_batch_norm_statistics(
            model, train_images, batch_size=run.train.batch_size * 2, device=device, precision=precision
        )
        reply = RecordDict(
            {
                "statistics": ArrayRecord({name: Array(value) for name, value in statistics.items()}),
                "metrics": MetricRecord({"num-examples": len(train_images)}),
                "site": ConfigRecord({"name": site.name}),
            }
        )
        return Message(reply, reply_to=message)

    @app.query(CLASS_COUNTS_ACTION)
    def class_counts(message: Message, context: Context) -> Message:
        run = RoundInstructions.from_coordinator(message.content["config"][INSTRUCTIONS_KEY]).run
        site = source.load(context, run)
        train_images, _ = training_images_of(site, run, source, context)
        reply = RecordDict(
            {
                "metrics": MetricRecord(
                    {"num-examples": len(train_images), CLASS_COUNTS_KEY: [int(count) for count in train_images.class_counts()]}
                ),
                "site": ConfigRecord({"name": site.name}),
            }
        )
        return Message(reply, reply_to=message)
