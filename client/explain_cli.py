"""`skin-fl-explain`: class probabilities and a Grad-CAM overlay for each lesion image, from saved model(s) or an ONNX export."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from shared.errors import DataError, ModelError, SkinFLError
from shared.version import add_version_option

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
DISPLAY_SIZE = 384
"""Side of the overlay PNG: the model's centre crop of the original photograph at this size."""


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of skin-fl-explain."""
    parser = argparse.ArgumentParser(
        prog="skin-fl-explain",
        description="Predict lesion classes for images and write a Grad-CAM overlay PNG per image, "
        "with a saved skin-fl model, an ensemble of several, or an ONNX export.",
    )
    add_version_option(parser)
    parser.add_argument("images", type=Path, nargs="+", help="image files and/or folders of images (.jpg, .png, ...)")
    source = parser.add_argument_group("model")
    source.add_argument("--model", type=Path, action="append", default=[],
                        help="saved model file or run folder; repeat to average several models (ensemble)")
    source.add_argument("--last", type=int, help="with a run folder: average its last K round checkpoints")
    source.add_argument("--onnx", type=Path, help="run an ONNX file written by --export-onnx instead (ONNX Runtime)")
    source.add_argument("--export-onnx", type=Path, metavar="FILE",
                        help="also write the (single) model as ONNX with class-activation maps to FILE")
    parser.add_argument("--output", type=Path, default=Path("explanations"), help="folder for overlays and predictions.json (default ./explanations)")
    parser.add_argument("--method", choices=["gradcam", "gradcam++"], default="gradcam", help="saliency method (PyTorch models)")
    parser.add_argument("--alpha", type=float, default=0.45, help="heatmap opacity in the overlay (0..1)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, help="CPU threads for inference")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (PyTorch models)")
    return parser


def image_paths(inputs: list[Path]) -> list[Path]:
    """The image files named directly or found (non-recursively) in the named folders, in order."""
    found: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found.extend(sorted(child for child in path.iterdir() if child.is_file() and child.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"{path} is neither an image file nor a folder; give lesion image files or folders of them")
    if not found:
        raise DataError(f"no images (.jpg, .png, ...) in {', '.join(map(str, inputs))}; give lesion image files or folders of them")
    return found


def _overlay_name(path: Path, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem) or "image"
    name, number = f"{stem}_gradcam.png", 1
    while name in used:
        number += 1
        name = f"{stem}_{number}_gradcam.png"
    used.add(name)
    return name


def load_explainer(args: argparse.Namespace):
    """The ensemble of saved models (PyTorch) or the ONNX classifier the options name."""
    if args.onnx is not None:
        if args.model or args.export_onnx:
            raise ModelError("--onnx runs an exported file on its own; leave out --model and --export-onnx")
        from shared.export import OnnxClassifier

        return OnnxClassifier.load(args.onnx, threads=args.threads)
    if not args.model:
        raise ModelError("name a model: --model final_model.pt (repeat for an ensemble), a run folder with --last K, or --onnx FILE")
    from shared.ensemble import Ensemble, expand_model_paths

    ensemble = Ensemble.load(expand_model_paths(args.model, args.last), device=args.device)
    if args.export_onnx is not None:
        if len(ensemble) != 1:
            raise ModelError(f"--export-onnx writes one model, but {len(ensemble)} are given; export each model on its own")
        from shared.export import export_onnx

        export_onnx(ensemble.members[0], ensemble.saved, args.export_onnx)
        ensemble.members[0].to(args.device)
        print(f"ONNX model written to {args.export_onnx}")
    return ensemble


def explain_images(args: argparse.Namespace) -> list[dict]:
    """Predict and explain every image; write overlays and predictions.json into the output folder."""
    import torch
    from PIL import Image

    from shared.data.images import decode_image
    from shared.data.transforms import preprocess_image, resize_and_centre_crop
    from shared.ensemble import normalise_pixels
    from shared.explain.gradcam import overlay_heatmap

    if not 0.0 <= args.alpha <= 1.0:
        raise DataError(f"--alpha {args.alpha} must lie in [0, 1]")
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = image_paths(args.images)
    explainer = load_explainer(args)
    saved = explainer.saved
    args.output.mkdir(parents=True, exist_ok=True)
    results, used = [], set()
    for start in range(0, len(paths), args.batch_size):
        batch_paths = paths[start : start + args.batch_size]
        pictures = [decode_image(path) for path in batch_paths]
        pixels = np.stack([preprocess_image(picture, saved.preprocess) for picture in pictures])
        inputs = normalise_pixels(pixels, saved.mean, saved.std)
        if hasattr(explainer, "members"):
            heatmaps, probabilities = explainer.explain(inputs, method=args.method, batch_size=args.batch_size)
        else:
            heatmaps, probabilities = explainer.explain(inputs)
        for path, picture, heatmap, row in zip(batch_paths, pictures, heatmaps, probabilities):
            display = resize_and_centre_crop(picture, DISPLAY_SIZE)
            name = _overlay_name(path, used)
            Image.fromarray(overlay_heatmap(display, heatmap, alpha=args.alpha)).save(args.output / name)
            predicted = int(row.argmax())
            results.append(
                {
                    "image": str(path),
                    "predicted": saved.classes[predicted],
                    "probability": float(row[predicted]),
                    "probabilities": {name_: float(value) for name_, value in zip(saved.classes, row)},
                    "overlay": name,
                }
            )
    payload = {
        "models": [str(path) for path in getattr(explainer, "paths", [args.onnx])],
        "runtime": "onnxruntime" if args.onnx is not None else "pytorch",
        "method": "gradcam (linear-head CAM)" if args.onnx is not None else args.method,
        "classes": saved.classes,
        "predictions": results,
    }
    (args.output / "predictions.json").write_text(json.dumps(payload, indent=2) + "\n")
    return results


def format_predictions(results: list[dict], classes: list[str]) -> str:
    """Aligned table: image, predicted class and its probability, then every class's probability."""
    names = [Path(result["image"]).name for result in results]
    width = max([len(name) for name in names] + [5])
    header = f"{'image':<{width}}  {'predicted':>9}  {'p':>5}" + "".join(f"  {name:>6}" for name in classes)
    lines = [header]
    for name, result in zip(names, results):
        lines.append(
            f"{name:<{width}}  {result['predicted']:>9}  {result['probability']:5.3f}"
            + "".join(f"  {result['probabilities'][cls]:6.3f}" for cls in classes)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of skin-fl-explain."""
    args = build_parser().parse_args(argv)
    try:
        results = explain_images(args)
    except SkinFLError as error:
        print(f"skin-fl-explain: error: {error}", file=sys.stderr)
        return 2
    classes = list(results[0]["probabilities"])
    print(format_predictions(results, classes))
    print(f"\n{len(results)} overlays and predictions.json written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
