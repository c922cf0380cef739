"""`skin-fl-gan-sample`: synthetic images of one class (a grid PNG or a folder of PNGs) from a saved generator."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from shared.errors import SkinFLError
from shared.version import add_version_option


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of skin-fl-gan-sample."""
    parser = argparse.ArgumentParser(
        prog="skin-fl-gan-sample",
        description="Sample synthetic lesion images of one class from a saved skin-fl GAN checkpoint "
        "(a run's gan/checkpoints/round_NNN.pt). Writes a grid PNG or a folder of PNG files.",
    )
    add_version_option(parser)
    parser.add_argument("checkpoint", type=Path, help="GAN checkpoint file")
    parser.add_argument("--class", dest="class_name", required=True, help="class to sample, e.g. df, vasc, akiec")
    parser.add_argument("--count", type=int, default=16, help="number of images (default 16)")
    parser.add_argument("--output", type=Path, required=True, help="grid PNG path (--grid) or folder for the images")
    parser.add_argument("--grid", action="store_true", help="write one grid PNG instead of a folder of images")
    parser.add_argument("--columns", type=int, default=8, help="images per grid row (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (same seed, same images)")
    return parser


def _grid(images: np.ndarray, columns: int, padding: int = 2) -> np.ndarray:
    rows = -(-len(images) // columns)
    side = images.shape[1]
    canvas = np.full((rows * (side + padding) + padding, columns * (side + padding) + padding, 3), 255, dtype=np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        top, left = padding + row * (side + padding), padding + column * (side + padding)
        canvas[top : top + side, left : left + side] = image
    return canvas


def sample_class(args: argparse.Namespace) -> list[Path]:
    """Generate and write the requested images; returns the written files."""
    from shared.gan.models import load_gan
    from shared.gan.training import generate, to_uint8_hwc

    if args.count < 1 or args.columns < 1:
        raise SkinFLError(f"--count ({args.count}) and --columns ({args.columns}) must be at least 1")
    generator, _, saved = load_gan(args.checkpoint)
    if args.class_name not in saved.classes:
        raise SkinFLError(f"class {args.class_name!r} is not one the generator knows; choose one of {', '.join(saved.classes)}")
    label = saved.classes.index(args.class_name)
    images = to_uint8_hwc(generate(generator, np.full(args.count, label), seed=args.seed))
    if args.grid:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_grid(images, args.columns)).save(args.output)
        return [args.output]
    args.output.mkdir(parents=True, exist_ok=True)
    written = []
    for index, image in enumerate(images):
        path = args.output / f"synthetic-{args.class_name}-seed{args.seed}-{index:04d}.png"
        Image.fromarray(image).save(path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Entry point of skin-fl-gan-sample."""
    args = build_parser().parse_args(argv)
    try:
        written = sample_class(args)
    except SkinFLError as error:
        print(f"skin-fl-gan-sample: error: {error}", file=sys.stderr)
        return 2
    target = written[0] if args.grid else args.output
    print(f"wrote {args.count} synthetic '{args.class_name}' image(s) ({'grid' if args.grid else 'folder'}): {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
