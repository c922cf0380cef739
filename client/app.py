"""Flower ClientApp: thin handlers that train and evaluate the global model on the site's images."""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.gan_handlers import register_gan_handlers
from client.model_queries import register_model_queries
from client.received import receive, round_training_images
from client.reply_guard import guard_replies
from client.site_source import NodeConfigSite, SimulationSites
from shared.data.feedback import feedback_summary
from shared.local_training import epoch_samples, evaluate_on_images, precision_for, site_round_seed, train_on_images
from shared.privacy.training import private_train_metrics
from shared.protocol import FINAL_REPORT_KEY, VALIDATION_CONFUSION_KEY
from shared.weights import model_to_arrays


def _nan_if_none(value) -> float:
    return float("nan") if value is None else float(value)


def evaluation_metric_record(metrics: dict, validation: dict | None = None) -> MetricRecord:
    """The aggregate-only metrics a site reports: scalars, per-class AUCs and the confusion counts.

    With `validation` (the same model on the site's validation split) the record also carries
    that split's confusion counts, from which the server selects the run's best round.
    """
    validation_counts = (
        {VALIDATION_CONFUSION_KEY: [int(count) for row in validation["confusion_matrix"] for count in row]}
        if validation is not None
        else {}
    )
    return MetricRecord(
        {
            **validation_counts,
            "num-examples": int(metrics["num_examples"]),
            "loss": float(metrics["loss"]),
            "accuracy": float(metrics["accuracy"]),
            "balanced-accuracy": float(metrics["balanced_accuracy"]),
            "macro-auc": _nan_if_none(metrics["macro_auc"]),
            "melanoma-sensitivity": _nan_if_none(metrics["melanoma_sensitivity"]),
            "melanoma-specificity": _nan_if_none(metrics["melanoma_specificity"]),
            "per-class-auc": [_nan_if_none(item["auc"]) for item in metrics["per_class"].values()],
            "confusion-matrix": [int(count) for row in metrics["confusion_matrix"] for count in row],
        }
    )


def create_client_app(site_source: SimulationSites | NodeConfigSite | None = None) -> ClientApp:
    """A ClientApp reading its site from a simulation manifest, or from the node config."""
    source = site_source if site_source is not None else NodeConfigSite()
    app = ClientApp(mods=[guard_replies])

    @app.train()
    def train(message: Message, context: Context) -> Message:
        received = receive(message, context, source)
        instructions, run, site, device, model, arrays = received.unpack()
        train_images, feedback_examples = round_training_images(received, source, context)
        precision = precision_for(model, run.train, device, run.preprocess.image_size, private=run.privacy.local)
        proximal = run.train.proximal_mu > 0
        train_round = train_on_images
        if run.privacy.local:
            from client.privacy_round import private_round_trainer  # Opacus and the ledger: only for DP rounds

            train_round = private_round_trainer(source, context, message, site.name, run, instructions.server_round)
        result = train_round(
            model,
            train_images,
            config=run.train,
            device=device,
            precision=precision,
            learning_rate_start=instructions.learning_rate_start,
            learning_rate_end=instructions.learning_rate_end,
            seed=site_round_seed(run.seed, instructions.server_round, site.name),
            global_arrays={name: torch.from_numpy(np.asarray(value)).to(device) for name, value in arrays.items()}
            if proximal
            else None,
            federation_class_counts=instructions.federation_class_counts,
            description=f"{site.name} round {instructions.server_round}",
        )
        if not math.isfinite(result.loss):
            raise RuntimeError(f"site {site.name}: training loss is not finite")
        reply = RecordDict(
            {
                "arrays": ArrayRecord({name: Array(value) for name, value in model_to_arrays(model).items()}),
                "metrics": MetricRecord(
                    {
                        # The averaging weight: the site's images, or under balance 'global' its balanced share.
                        "num-examples": epoch_samples(train_images, run.train, instructions.federation_class_counts),
                        "train-loss": float(result.loss),
                        "train-seconds": float(result.seconds),
                        "images-per-second": float(result.images_per_second),
                        "feedback-examples": int(feedback_examples),
                        **private_train_metrics(result),
                    }
                ),
                "site": ConfigRecord({"name": site.name, "precision": precision.name, "device": str(device)}),
            }
        )
        return Message(reply, reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        instructions, run, site, device, model, _ = receive(message, context, source).unpack()
        test_images = site.images.select("test")
        precision = precision_for(model, run.train, device, run.preprocess.image_size)
        metrics = evaluate_on_images(model, test_images, batch_size=run.train.batch_size * 2, device=device, precision=precision)
        val_images = site.images.select("val")
        validation = (
            evaluate_on_images(model, val_images, batch_size=run.train.batch_size * 2, device=device, precision=precision)
            if len(val_images)
            else None
        )
        if message.content["config"].get(FINAL_REPORT_KEY, False):
            # The report stays on this machine; the reply carries the same aggregate metrics as every round.
            from client.report import site_report_folder, write_end_of_run_report  # plots: only for the last round

            folder = site_report_folder(source, context, site.name)
            write_end_of_run_report(
                folder, model, run, test_images, site=site.name, server_round=instructions.server_round,
                train_images=site.images.select("train"), device=device,
                seed=site_round_seed(run.seed, instructions.server_round + 1, site.name),
                extra=feedback_summary(site.feedback),
            )
        reply = RecordDict(
            {"metrics": evaluation_metric_record(metrics, validation), "site": ConfigRecord({"name": site.name})}
        )
        return Message(reply, reply_to=message)

    register_model_queries(app, source)
    register_gan_handlers(app, source)
    return app


app = create_client_app()
