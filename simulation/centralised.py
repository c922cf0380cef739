"""Pooled (centralised) training on all sites' data with the federated run's exact budget and schedule."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from shared.config import RunConfig
from shared.data.cache import CachedImages, concatenate
from shared.device import resolve_device
from shared.durable_files import write_json_atomically
from shared.local_training import evaluate_on_images, precision_for, seed_everything, train_on_images
from shared.metrics import metrics_from_confusion
from shared.models.classifier import build_classifier, save_classifier
from shared.run_folder import RunFolder
from shared.training import cosine_learning_rate

logger = logging.getLogger(__name__)


def summarise_site_evaluations(per_site: dict[str, dict]) -> dict:
    """Overall figures over sites: pooled counts from summed confusion matrices, weighted AUC."""
    confusion = np.sum([np.asarray(metrics["confusion_matrix"]) for metrics in per_site.values()], axis=0)
    pooled = metrics_from_confusion(confusion)
    sizes = {site: metrics["num_examples"] for site, metrics in per_site.items()}
    aucs = [(metrics["macro_auc"], sizes[site]) for site, metrics in per_site.items() if metrics["macro_auc"] is not None]
    return {
        "num_examples": int(sum(sizes.values())),
        "accuracy": float(pooled["accuracy"]),
        "balanced_accuracy": float(pooled["balanced_accuracy"]),
        "mean_site_balanced_accuracy": float(np.mean([m["balanced_accuracy"] for m in per_site.values()])),
        "macro_auc": float(sum(a * n for a, n in aucs) / sum(n for _, n in aucs)) if aucs else None,
    }


def pooled_run(run: RunConfig, num_sites: int) -> RunConfig:
    """The run's settings for pooled training: fixed local steps become the whole federation's steps of a round."""
    if run.train.local_steps is None:
        return run
    return run.model_copy(update={"train": run.train.model_copy(update={"local_steps": run.train.local_steps * num_sites})})


def train_centralised(run: RunConfig, site_images: dict[str, CachedImages], run_folder: Path) -> dict:
    """Train one model on the union of the sites' training splits; evaluate it on every site's test split.

    The budget equals the federated run's: rounds x local epochs over the pooled data, with
    the same cosine learning-rate schedule, evaluated at the same points.
    """
    folder = RunFolder(run_folder).centralised
    folder.path.mkdir(parents=True, exist_ok=True)
    run = pooled_run(run, len(site_images))
    seed_everything(run.seed)
    device = resolve_device(run.train.device)
    model = build_classifier(run.model, num_classes=len(run.classes)).to(device)
    pooled_train = concatenate([images.select("train") for images in site_images.values()])
    tests = {site: images.select("test") for site, images in site_images.items()}
    precision = precision_for(model, run.train, device, run.preprocess.image_size)
    rounds, base, floor = run.federation.rounds, run.train.learning_rate, run.train.min_learning_rate_ratio
    history = []
    started = time.monotonic()
    for chunk in range(1, rounds + 1):
        chunk_started = time.monotonic()
        result = train_on_images(
            model,
            pooled_train,
            config=run.train,
            device=device,
            precision=precision,
            learning_rate_start=cosine_learning_rate(base, floor, (chunk - 1) / rounds),
            learning_rate_end=cosine_learning_rate(base, floor, chunk / rounds),
            seed=run.seed * 100_003 + chunk * 1_009,
            description=f"pooled epochs {chunk}/{rounds}",
        )
        per_site = {
            site: evaluate_on_images(model, images, batch_size=run.train.batch_size * 2, device=device, precision=precision)
            for site, images in tests.items()
        }
        history.append(
            {
                "round": chunk,
                "train": {"loss": result.loss, "seconds": result.seconds, "images_per_second": result.images_per_second},
                "evaluate": summarise_site_evaluations(per_site),
                "sites": per_site,
            }
        )
        overall = history[-1]["evaluate"]
        auc = "-" if overall["macro_auc"] is None else f"{overall['macro_auc']:.3f}"
        logger.info(
            "pooled %d/%d: train loss %.3f, bal. acc %.3f, AUC %s, %.0f s",
            chunk, rounds, result.loss, overall["balanced_accuracy"], auc, time.monotonic() - chunk_started,
        )
        write_json_atomically(folder.history, {"rounds": history})
    wall_seconds = time.monotonic() - started
    save_classifier(
        folder.final_model,
        model,
        model_name=run.model.name,
        classes=run.classes,
        preprocess=run.preprocess,
        metadata={"mode": "centralised", "epochs": rounds * run.train.local_epochs, "wall_seconds": wall_seconds},
    )
    return {"history": history, "wall_seconds": wall_seconds, "precision": precision.name, "final": history[-1]}
