"""Benchmark: per-image CPU latency of inference and inference + Grad-CAM, PyTorch vs ONNX Runtime, at several sizes."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
TARGET_MS = 150.0
"""Edge target: inference + Grad-CAM per image at 224 px."""


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the latency benchmark."""
    parser = argparse.ArgumentParser(
        prog="python -m simulation.latency_benchmark",
        description="Per-image latency of the classifier on CPU: inference and inference + Grad-CAM, with PyTorch "
        "and with ONNX Runtime (Grad-CAM there from the exported class-activation maps of the linear head).",
    )
    parser.add_argument("--model-file", type=Path, help="saved skin-fl model (default: tf_efficientnet_lite0 with the packaged weights, 7 classes)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224], help="square input sizes (default 128 224)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for PyTorch and ONNX Runtime (default 2)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per call (default 1: one patient image at a time)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    parser.add_argument("--output", type=Path, help="JSON file for the figures")
    return parser


def _time_calls(call, repeats: int, warmup: int, batch_size: int) -> dict:
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    per_image = sorted(value * 1000 / batch_size for value in seconds)
    return {
        "median_ms": statistics.median(per_image),
        "p90_ms": per_image[min(len(per_image) - 1, int(round(0.9 * (len(per_image) - 1))))],
        "min_ms": per_image[0],
    }


def _model(model_file: Path | None, size: int):
    from shared.config import ModelConfig, PreprocessConfig
    from shared.models.classifier import SavedClassifier, build_classifier, load_classifier, model_normalisation

    if model_file is not None:
        model, saved = load_classifier(model_file)
    else:
        model = build_classifier(ModelConfig(name="tf_efficientnet_lite0", pretrained="default"), num_classes=len(CLASSES))
        mean, std = model_normalisation(model)
        saved = SavedClassifier("tf_efficientnet_lite0", CLASSES, PreprocessConfig(image_size=size), mean, std)
    saved.preprocess = saved.preprocess.model_copy(update={"image_size": size})
    return model.eval(), saved


def measure(args: argparse.Namespace) -> dict:
    """Latency figures for every size: PyTorch and ONNX Runtime, inference alone and with Grad-CAM."""
    import torch

    from shared.explain.gradcam import GradCam
    from shared.export import OnnxClassifier, export_onnx
    from shared.training import place_model

    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory(prefix="skin-fl-latency-") as scratch:
        for size in args.sizes:
            model, saved = _model(args.model_file, size)
            images = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
            onnx_plain = OnnxClassifier.load(export_onnx(model, saved, Path(scratch) / f"plain_{size}.onnx", with_cams=False), threads=args.threads)
            onnx_cams = OnnxClassifier.load(export_onnx(model, saved, Path(scratch) / f"cams_{size}.onnx"), threads=args.threads)
            model = place_model(model, torch.device("cpu")).eval()
            channels_last = images.contiguous(memory_format=torch.channels_last)

            def torch_inference():
                with torch.no_grad():
                    model(channels_last).softmax(dim=1)

            row = {"pytorch_inference": _time_calls(torch_inference, args.repeats, args.warmup, args.batch_size)}
            with GradCam(model) as cam:
                row["pytorch_inference_gradcam"] = _time_calls(lambda: cam(channels_last), args.repeats, args.warmup, args.batch_size)
            numpy_images = images.numpy()
            row["onnx_inference"] = _time_calls(lambda: onnx_plain.predict(numpy_images), args.repeats, args.warmup, args.batch_size)
            row["onnx_inference_gradcam"] = _time_calls(lambda: onnx_cams.explain(numpy_images), args.repeats, args.warmup, args.batch_size)
            results[str(size)] = row
    return results


def format_results(results: dict) -> str:
    """Aligned table of median (p90) milliseconds per image."""
    columns = ("pytorch_inference", "pytorch_inference_gradcam", "onnx_inference", "onnx_inference_gradcam")
    header = f"{'size':>5}" + "".join(f"  {column:>26}" for column in columns)
    lines = [header]
    for size, row in results.items():
        cells = "".join(f"  {row[column]['median_ms']:>12.1f} ({row[column]['p90_ms']:>6.1f}) ms" for column in columns)
        lines.append(f"{size:>5}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point: measure, print the table with the machine load, optionally save JSON."""
    args = build_parser().parse_args(argv)
    load_before = os.getloadavg()
    results = measure(args)
    load_after = os.getloadavg()
    print(f"per-image latency, median (p90), batch {args.batch_size}, {args.threads} threads, {args.repeats} calls:")
    print(format_results(results))
    largest = str(max(args.sizes))
    best = min(results[largest]["pytorch_inference_gradcam"]["median_ms"], results[largest]["onnx_inference_gradcam"]["median_ms"])
    print(f"inference + Grad-CAM at {largest} px: best median {best:.1f} ms (target <= {TARGET_MS:.0f} ms at 224 px)")
    print(f"load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
          f"after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} on {os.cpu_count()} cores")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        payload = {"threads": args.threads, "batch_size": args.batch_size, "repeats": args.repeats,
                   "load_before": load_before, "load_after": load_after, "results": results}
        args.output.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
