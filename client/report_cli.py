"""`skin-fl-report`: write a site's evaluation report (metrics, plots, Grad-CAM gallery) for saved model(s) on a data folder."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from shared.errors import SkinFLError
from shared.version import add_version_option

DEFAULT_CACHE_DIR = Path(os.environ.get("SKIN_FL_CACHE_DIR", Path.home() / ".cache" / "skin-fl"))


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of skin-fl-report."""
    parser = argparse.ArgumentParser(
        prog="skin-fl-report",
        description="Write a local evaluation report folder: metrics.json (incl. ISIC challenge metrics), per-class "
        "table, confusion matrix and ROC curve PNGs, and an offline Grad-CAM gallery. Every image of the folder is test data.",
    )
    add_version_option(parser)
    parser.add_argument("model", type=Path, nargs="+",
                        help="saved model file(s) or run folders; several are averaged as an ensemble")
    parser.add_argument("--last", type=int, help="with a run folder: average its last K round checkpoints")
    parser.add_argument("--data", type=Path, required=True, help="dataset folder in any supported format")
    parser.add_argument("--format", choices=["ham10000", "isic2019", "isic2020", "folder"], help="dataset format (detected when omitted)")
    parser.add_argument("--output", type=Path, required=True, help="report folder to write (created; files in it are replaced)")
    parser.add_argument("--site", help="site name shown in the report (default: the data folder's name)")
    parser.add_argument("--gallery-size", type=int, default=3, help="correct and wrong Grad-CAM examples per class (default 3)")
    parser.add_argument("--method", choices=["gradcam", "gradcam++"], default="gradcam")
    parser.add_argument("--skip-bad", action="store_true", help="leave out unreadable images and labels the model does not know, listing them")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help=f"decoded-image cache (default {DEFAULT_CACHE_DIR})")
    return parser


def write_report(args: argparse.Namespace) -> dict:
    """Load the model(s), read the data folder as test images and write the report folder."""
    from client.evaluate_cli import read_test_images
    from client.report import write_site_report
    from shared.device import resolve_device
    from shared.ensemble import Ensemble, expand_model_paths

    if args.gallery_size < 0:
        raise SkinFLError(f"--gallery-size {args.gallery_size} must be 0 or more")
    device = resolve_device(args.device)
    ensemble = Ensemble.load(expand_model_paths(args.model, args.last), device=str(device))
    data_format, table, images = read_test_images(args.data, args.format, ensemble.saved, args.cache_dir, args.skip_bad)
    skipped = [{"source": row.source, "reason": row.reason} for row in table.skipped + list(images.skipped)]
    return write_site_report(
        args.output, ensemble, images, site=args.site or Path(args.data).name, gallery_per_class=args.gallery_size,
        method=args.method, batch_size=args.batch_size,
        extra={"data": str(args.data), "format": data_format, "skipped": skipped},
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of skin-fl-report."""
    args = build_parser().parse_args(argv)
    try:
        report = write_report(args)
    except SkinFLError as error:
        print(f"skin-fl-report: error: {error}", file=sys.stderr)
        return 2
    print((args.output / "per_class.txt").read_text().rstrip())
    aggregate = report["isic"]["aggregate"]
    print(
        f"\n{report['num_examples']} images, {len(report['models'])} model(s): balanced accuracy "
        f"{aggregate['balanced_accuracy']:.3f}, accuracy {report['metrics']['accuracy']:.3f}"
    )
    print(f"report written to {args.output} (open gallery.html in a browser)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
