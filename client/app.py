"""Flower ClientApp: thin handlers that train and evaluate the global model on the site's images."""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site_source import NodeConfigSite, SimulationSites
from shared.config import RoundInstructions
from shared.device import resolve_device
from shared.local_training import evaluate_on_images, precision_for, train_on_images
from shared.models.classifier import build_classifier
from shared.weights import load_arrays_into, model_to_arrays

INSTRUCTIONS_KEY = "instructions"


def _nan_if_none(value) -> float:
    return float("nan") if value is None else float(value)


def _global_model(message: Message, instructions: RoundInstructions, device: torch.device):
    run = instructions.run
    model = build_classifier(run.model, num_classes=len(run.classes))
    arrays = {name: array.numpy() for name, array in message.content["arrays"].items()}
    load_arrays_into(model, arrays)
    return model.to(device), arrays


def evaluation_metric_record(metrics: dict) -> MetricRecord:
    """The aggregate-only metrics a site reports: scalars, per-class AUCs and the confusion counts."""
    return MetricRecord(
        {
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
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        instructions = RoundInstructions.model_validate_json(message.content["config"][INSTRUCTIONS_KEY])
        run = instructions.run
        site = source.load(context, run)
        device = resolve_device(run.train.device)
        model, arrays = _global_model(message, instructions, device)
        train_images = site.images.select("train")
        precision = precision_for(model, run.train, device, run.preprocess.image_size)
        proximal = run.train.proximal_mu > 0
        result = train_on_images(
            model,
            train_images,
            config=run.train,
            device=device,
            precision=precision,
            learning_rate_start=instructions.learning_rate_start,
            learning_rate_end=instructions.learning_rate_end,
            seed=run.seed * 100_003 + instructions.server_round * 1_009 + zlib.crc32(site.name.encode()) % 1_000,
            global_arrays={name: torch.from_numpy(np.asarray(value)).to(device) for name, value in arrays.items()}
            if proximal
            else None,
            description=f"{site.name} round {instructions.server_round}",
        )
        if not math.isfinite(result.loss):
            raise RuntimeError(f"site {site.name}: training loss is not finite")
        reply = RecordDict(
            {
                "arrays": ArrayRecord({name: Array(value) for name, value in model_to_arrays(model).items()}),
                "metrics": MetricRecord(
                    {
                        "num-examples": len(train_images),
                        "train-loss": float(result.loss),
                        "train-seconds": float(result.seconds),
                        "images-per-second": float(result.images_per_second),
                    }
                ),
                "site": ConfigRecord({"name": site.name, "precision": precision.name, "device": str(device)}),
            }
        )
        return Message(reply, reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        instructions = RoundInstructions.model_validate_json(message.content["config"][INSTRUCTIONS_KEY])
        run = instructions.run
        site = source.load(context, run)
        device = resolve_device(run.train.device)
        model, _ = _global_model(message, instructions, device)
        test_images = site.images.select("test")
        precision = precision_for(model, run.train, device, run.preprocess.image_size)
        metrics = evaluate_on_images(model, test_images, batch_size=run.train.batch_size * 2, device=device, precision=precision)
        reply = RecordDict({"metrics": evaluation_metric_record(metrics), "site": ConfigRecord({"name": site.name})})
        return Message(reply, reply_to=message)

    return app


app = create_client_app()
