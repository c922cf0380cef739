"""`skin-fl-eval`: score a saved skin-fl model on any dataset folder (external validation)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from shared.errors import DataError, SkinFLError
from shared.version import add_version_option

DEFAULT_CACHE_DIR = Path(os.environ.get("SKIN_FL_CACHE_DIR", Path.home() / ".cache" / "skin-fl"))


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of skin-fl-eval."""
    parser = argparse.ArgumentParser(
        prog="skin-fl-eval",
        description="Score a saved skin-fl model (e.g. a run's final_model.pt) on a dataset folder; every image is test data.",
    )
    add_version_option(parser)
    parser.add_argument(
        "model", type=Path, nargs="+",
        help="saved model file(s) (final_model.pt, round checkpoints) or run folders; several are averaged as an ensemble",
    )
    parser.add_argument("--last", type=int, help="with a run folder: average its last K round checkpoints")
    parser.add_argument("--data", type=Path, required=True, help="dataset folder in any supported format")
    parser.add_argument("--format", choices=["ham10000", "isic2019", "isic2020", "folder"], help="dataset format (detected when omitted)")
    parser.add_argument("--output", type=Path, help="metrics JSON to write (default: <model folder>/eval_<data folder name>.json)")
    parser.add_argument("--skip-bad", action="store_true", help="leave out unreadable images and labels the model does not know, listing them")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help=f"decoded-image cache (default {DEFAULT_CACHE_DIR})")
    return parser


def _restrict_to_model_classes(table, classes: list[str], skip_bad: bool):
    from shared.data.records import SkippedRow

    foreign = ~table.frame["label"].isin(classes)
    if not foreign.any():
        return table
    labels = sorted(set(table.frame.loc[foreign, "label"]))
    if not skip_bad:
        raise DataError(
            f"{int(foreign.sum())} images in {table.root} have labels {labels} that the model was not trained on "
            f"(its classes: {classes}); pass --skip-bad to score the others and list these"
        )
    kept = table.subset((~foreign).to_numpy())
    kept.skipped = table.skipped + [
        SkippedRow(source=str(row.path), reason=f"label {row.label!r} not among the model's classes")
        for row in table.frame[foreign].itertuples()
    ]
    return kept


def read_test_images(data: Path, data_format: str | None, saved, cache_dir: Path, skip_bad: bool):
    """Every image of a dataset folder as one cached test split in the model's classes and preprocessing.

    Returns (format, table, images).
    """
    import hashlib

    from shared.data.readers import detect_format, read_dataset
    from shared.site_data import prepare_site_images

    data_format = data_format or detect_format(data)
    table = read_dataset(data, data_format, skip_bad=skip_bad)
    table = _restrict_to_model_classes(table, saved.classes, skip_bad)
    table.frame["split"] = "test"
    folder_key = hashlib.sha256(str(Path(data).resolve()).encode()).hexdigest()[:12]
    images = prepare_site_images(
        table,
        site=f"eval-{Path(data).name}-{folder_key}",
        classes=saved.classes,
        split_fractions=(0.7, 0.15, 0.15),
        seed=0,
        cache_root=Path(cache_dir) / "images",
        preprocess=saved.preprocess,
        skip_bad=skip_bad,
    )
    return data_format, table, images


def evaluate_saved_model(args: argparse.Namespace) -> dict:
    """Load the model(s), read and cache the data as one test split, and compute the metrics."""
    import numpy as np

    from client.report import predict_images
    from shared.device import resolve_device
    from shared.ensemble import Ensemble, expand_model_paths
    from shared.isic_metrics import isic_scores
    from shared.metrics import classification_metrics

    device = resolve_device(args.device)
    paths = expand_model_paths(args.model, args.last)
    ensemble = Ensemble.load(paths, device=str(device))
    saved = ensemble.saved
    data_format, table, images = read_test_images(args.data, args.format, saved, args.cache_dir, args.skip_bad)
    probabilities = predict_images(ensemble, images, args.batch_size)
    metrics = classification_metrics(images.labels, probabilities, saved.classes)
    true_class_probabilities = probabilities[np.arange(len(images)), np.asarray(images.labels, dtype=np.int64)]
    metrics["loss"] = float(-np.log(np.clip(true_class_probabilities, 1e-12, None)).mean())
    metrics["isic"] = isic_scores(images.labels, probabilities, saved.classes)
    skipped = [{"source": row.source, "reason": row.reason} for row in table.skipped + list(images.skipped)]
    return {
        "model": str(paths[0]),
        "models": [str(path) for path in paths],
        "data": str(args.data),
        "format": data_format,
        "skipped": skipped,
        "metrics": metrics,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of skin-fl-eval."""
    args = build_parser().parse_args(argv)
    try:
        result = evaluate_saved_model(args)
    except SkinFLError as error:
        print(f"skin-fl-eval: error: {error}", file=sys.stderr)
        return 2
    from shared.metrics import format_metrics_table

    metrics = result["metrics"]
    print(format_metrics_table(metrics["per_class"], ["precision", "recall", "f1", "auc", "support"]))
    print(
        f"\n{metrics['num_examples']} images: balanced accuracy {metrics['balanced_accuracy']:.3f}, "
        f"accuracy {metrics['accuracy']:.3f}, macro AUC "
        + (f"{metrics['macro_auc']:.3f}" if metrics["macro_auc"] is not None else "-")
    )
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])} images (listed in the JSON)")
    if len(result["models"]) > 1:
        print(f"ensemble of {len(result['models'])} models (mean probabilities)")
    output = args.output or Path(result["model"]).parent / f"eval_{args.data.name}.json"
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"metrics written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
