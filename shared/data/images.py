"""Decoding one image file into an RGB PIL image, with errors that name the file and the fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shared.errors import DataError

BAD_IMAGE_FIX = "re-export or remove this file, or pass --skip-bad to leave bad images out and list them"

_WIDE_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
"""16-bit greyscale (some PNG/TIFF exports): converted to RGB by scaling, as PIL would clip it."""


def decode_image(path: Path, *, draft_size: int | None = None) -> Image.Image:
    """Fully decode an image file into an upright RGB image; bad files raise `DataError`.

    PIL's LOAD_TRUNCATED_IMAGES is left False, so a truncated file fails here rather than
    decoding with a grey band.

    `draft_size` lets JPEG decoding scale down by 2/4/8 while both sides stay at least that
    many pixels, which makes decoding large dermoscopy photographs several times faster.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file {path} does not exist; {BAD_IMAGE_FIX}")
    try:
        with Image.open(path) as opened:
            if draft_size is not None and opened.format == "JPEG":
                opened.draft("RGB", (draft_size, draft_size))
            opened.load()
            upright = ImageOps.exif_transpose(opened)
            return _to_rgb(upright)
    except UnidentifiedImageError as error:
        raise DataError(f"{path} is not an image file that can be read ({error}); {BAD_IMAGE_FIX}") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"image file {path} is corrupt, truncated or too large ({error}); {BAD_IMAGE_FIX}") from error


def _to_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB mode (greyscale, palette, RGBA, CMYK and 16-bit greyscale included)."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_INTEGER_MODES:
        grey = (np.asarray(image, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")
