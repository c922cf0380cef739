"""The federated GAN phase of a run: GAN rounds with FedAvg of both networks, checkpoints, grids, synthesis at the sites."""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords, sample_nodes

from server.privacy_budget import PrivacyBudget
from server.strategy import site_name_of
from shared.config import RunConfig
from shared.durable_files import replaced_atomically, write_json_atomically
from shared.errors import ModelError, SkinFLError
from shared.gan.models import (
    build_gan,
    gan_checkpoint_path,
    gan_to_arrays,
    latest_gan_checkpoint,
    load_gan,
    load_gan_arrays,
    save_gan,
)
from shared.gan.quality import save_class_grid
from shared.protocol import (
    FEATURE_CLASSES_KEY,
    FEATURE_MODEL_KEY,
    GAN_SYNTHESISE_MESSAGE,
    GAN_TRAIN_MESSAGE,
    QUALITY_KEY,
    ROUND_KEY,
    RUN_KEY,
)
from shared.run_folder import RunFolder

logger = logging.getLogger(__name__)
WEIGHTING_KEY = "num-examples"


@dataclass
class FeatureClassifier:
    """The classifier (name, class count, weights) whose features measure and select GAN images."""

    model_name: str
    num_classes: int
    arrays: dict[str, np.ndarray]


@dataclass
class GanPhaseOutcome:
    """What the GAN phase produced: rounds run, last checkpoint, per-round history and site reports."""

    rounds_run: list[int] = field(default_factory=list)
    last_checkpoint: Path | None = None
    history: list[dict] = field(default_factory=list)
    site_reports: dict[str, dict] = field(default_factory=dict)


def _array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def _site_nodes(grid: Grid, run: RunConfig, num_sites: int | None) -> list[int]:
    minimum = min(run.federation.min_sites, num_sites or run.federation.min_sites)
    _, all_nodes = sample_nodes(grid, minimum, minimum)
    return sorted(all_nodes)


def _exchange(grid: Grid, run: RunConfig, nodes: list[int], content: RecordDict, message_type: str, group: str) -> list[Message]:
    messages = [Message(content, dst_node_id=node, message_type=message_type, group_id=group) for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=run.federation.round_timeout_s))
    good = [reply for reply in replies if not reply.has_error()]
    for reply in replies:
        if reply.has_error():
            logger.error("GAN %s: node %s failed: %s", group, reply.metadata.src_node_id, reply.error.reason)
    if not good:
        reasons = "; ".join(str(reply.error.reason)[:300] for reply in replies if reply.has_error()) or "no replies"
        raise SkinFLError(f"GAN {group}: no site replied successfully ({reasons}); see the site logs")
    return good


def run_gan_phase(grid: Grid, run: RunConfig, run_folder: Path, features: FeatureClassifier, num_sites: int | None = None) -> GanPhaseOutcome:
    """Run GAN rounds `start_round..rounds`, checkpoint every round, then have the sites synthesise when asked."""
    gan = run.gan
    layout = RunFolder(run_folder)
    layout.gan.mkdir(parents=True, exist_ok=True)
    already = latest_gan_checkpoint(run_folder)
    if gan.generator is None and already is not None:
        # The same run folder again (a resumed run): continue after its last checkpointed GAN round.
        gan = gan.model_copy(update={"generator": str(already[1]), "start_round": already[0] + 1})
        run = run.model_copy(update={"gan": gan})
        logger.info("GAN phase continues after round %d from %s", already[0], already[1])
    if gan.generator is not None:
        generator, discriminator, saved = load_gan(gan.generator)
        if saved.classes != run.classes or saved.gan_config(gan) != gan:
            raise ModelError(
                f"GAN checkpoint {gan.generator} has classes {saved.classes} and size/latent/channels "
                f"{saved.image_size}/{saved.latent_dim}/{saved.channels}; run with the same classes and GAN architecture"
            )
    else:
        generator, discriminator = build_gan(gan, len(run.classes))
    outcome = GanPhaseOutcome(last_checkpoint=Path(gan.generator) if gan.generator else None)
    outcome.history = [entry for entry in layout.gan_history_rounds() if entry["round"] < gan.start_round]
    classifier = _array_record(features.arrays)
    run_json = run.model_dump_json()
    nodes = _site_nodes(grid, run, num_sites)
    budget = PrivacyBudget(run, run_folder) if run.privacy.local else None
    for server_round in range(gan.start_round, gan.rounds + 1):
        started = time.monotonic()
        quality = server_round % gan.grid_every == 0 or server_round == gan.rounds
        config = ConfigRecord(
            {RUN_KEY: run_json, ROUND_KEY: server_round, QUALITY_KEY: quality,
             FEATURE_MODEL_KEY: features.model_name, FEATURE_CLASSES_KEY: features.num_classes}
        )
        if budget is not None and budget.before_gan_round(server_round, config) is not None:
            break
        content = RecordDict({"arrays": _array_record(gan_to_arrays(generator, discriminator)), "config": config})
        if quality:
            content["classifier"] = classifier
        replies = _exchange(grid, run, nodes, content, GAN_TRAIN_MESSAGE, f"gan-round-{server_round}")
        averaged = aggregate_arrayrecords([reply.content for reply in replies], WEIGHTING_KEY)
        load_gan_arrays(generator, discriminator, {name: array.numpy() for name, array in averaged.items()})
        outcome.last_checkpoint = save_gan(
            gan_checkpoint_path(run_folder, server_round), generator, discriminator, run.classes,
            {"round": server_round, "gan": gan.model_dump(mode="json"), "seed": run.seed},
        )
        entry = _round_entry(server_round, replies, time.monotonic() - started)
        if budget is not None:
            entry["privacy"] = budget.after_gan_round(server_round, replies)
        if quality:
            save_class_grid(generator, run.classes, layout.gan_grid(server_round), seed=run.seed)
        outcome.history.append(entry)
        outcome.rounds_run.append(server_round)
        write_json_atomically(layout.gan_history, {"classes": run.classes, "grid_rows": run.classes, "rounds": outcome.history})
        logger.info("GAN round %d: %s", server_round, {k: v for k, v in entry.items() if k != "sites"})
    if gan.augment:
        outcome.site_reports = synthesise_at_sites(grid, run, run_folder, generator, discriminator, classifier, features, nodes)
    return outcome


def _round_entry(server_round: int, replies: list[Message], seconds: float) -> dict:
    per_site = {site_name_of(reply): dict(next(iter(reply.content.metric_records.values()))) for reply in replies}
    weights = np.asarray([metrics[WEIGHTING_KEY] for metrics in per_site.values()], dtype=np.float64)
    entry: dict = {"round": server_round, "wall_seconds": seconds}
    for key in ("discriminator-loss", "generator-loss", "frechet-distance"):
        values = [metrics.get(key) for metrics in per_site.values()]
        if all(value is not None for value in values):
            entry[key] = float(np.average(np.asarray(values, dtype=np.float64), weights=weights))
    entry["sites"] = per_site
    return entry


def synthesise_at_sites(grid, run, run_folder, generator, discriminator, classifier, features, nodes) -> dict[str, dict]:
    """Send the global GAN to every site, which selects and stores its synthetic images; write the counts table."""
    content = RecordDict(
        {
            "arrays": _array_record(gan_to_arrays(generator, discriminator)),
            "classifier": classifier,
            "config": ConfigRecord(
                {RUN_KEY: run.model_dump_json(), FEATURE_MODEL_KEY: features.model_name, FEATURE_CLASSES_KEY: features.num_classes}
            ),
        }
    )
    replies = _exchange(grid, run, nodes, content, GAN_SYNTHESISE_MESSAGE, "gan-synthesis")
    reports = {site_name_of(reply): dict(reply.content["metrics"]) for reply in replies}
    if len(replies) < len(nodes):
        raise SkinFLError(
            f"only {len(replies)} of {len(nodes)} sites synthesised their images; the others cannot train augmented. "
            "Fix the failing sites (see their logs) and rerun"
        )
    write_synthetic_counts(Path(run_folder), reports)
    return reports


SYNTHETIC_COUNT_COLUMNS = (
    "num-examples", "synthetic-images", "candidates", "rejected-unrealistic", "rejected-memorised", "rejected-near-duplicate"
)


def write_synthetic_counts(run_folder: Path, reports: dict[str, dict]) -> Path:
    """`synthetic_counts.csv` (each site's real and synthetic training images, candidates, rejections) and `gan/selection.json`.

    Sites send totals only (per-class counts stay in each site's own selection report), and a
    private run sends no candidate or rejection counts: those cells stay empty.
    """
    path = RunFolder(run_folder).synthetic_counts
    with replaced_atomically(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["site", *(column.replace("num-examples", "real-images") for column in SYNTHETIC_COUNT_COLUMNS)])
        for site, report in sorted(reports.items()):
            writer.writerow([site, *(int(report[column]) if column in report else "" for column in SYNTHETIC_COUNT_COLUMNS)])
    write_json_atomically(RunFolder(run_folder).gan_selection, reports)
    return path


def feature_classifier_for(run: RunConfig, initial_model) -> FeatureClassifier:
    """The feature classifier the run names (`gan.feature_classifier`), else the run's initial global classifier."""
    from shared.models.classifier import load_classifier
    from shared.weights import model_to_arrays

    if run.gan.feature_classifier is not None:
        model, saved = load_classifier(run.gan.feature_classifier)
        return FeatureClassifier(saved.model_name, len(saved.classes), model_to_arrays(model))
    return FeatureClassifier(run.model.name, len(run.classes), model_to_arrays(initial_model))
