"""Tests of image decoding: RGB output, EXIF orientation, and errors that name the bad file."""

import numpy as np
import pytest
from PIL import Image, ImageFile

from shared.data.images import decode_image
from shared.errors import DataError


def _noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_decodes_a_jpeg_to_a_loaded_rgb_image(tmp_path):
    path = tmp_path / "lesion.jpg"
    _noise_image(40, 30).save(path, quality=95)
    image = decode_image(path)
    assert image.mode == "RGB" and image.size == (40, 30)
    assert np.asarray(image).shape == (30, 40, 3)


def test_missing_file_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"absent_lesion\.jpg does not exist.*--skip-bad"):
        decode_image(tmp_path / "absent_lesion.jpg")


def test_text_file_named_jpg_is_not_an_image(tmp_path):
    path = tmp_path / "notes_lesion.jpg"
    path.write_text("patient notes, not pixels\n")
    with pytest.raises(DataError, match=r"notes_lesion\.jpg is not an image.*re-export or remove"):
        decode_image(path)


def test_truncated_jpeg_fails_at_decode_time(tmp_path):
    whole = tmp_path / "whole.jpg"
    _noise_image(160, 120).save(whole, quality=90)
    data = whole.read_bytes()
    cut = tmp_path / "cut_lesion.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut_lesion\.jpg is corrupt, truncated.*--skip-bad"):
        decode_image(cut)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P"])
def test_other_colour_modes_become_rgb(tmp_path, mode):
    path = tmp_path / f"lesion_{mode}.{'jpg' if mode in ('L', 'CMYK') else 'png'}"
    _noise_image(40, 30).convert(mode).save(path)
    image = decode_image(path)
    assert image.mode == "RGB" and image.size == (40, 30)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((30, 40), 32768, dtype=np.uint16)).save(path)
    pixels = np.asarray(decode_image(path))
    assert pixels.shape == (30, 40, 3)
    assert np.all(pixels == 128)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    _noise_image(40, 30).save(path, exif=exif)
    assert decode_image(path).size == (30, 40)


def test_draft_size_decodes_large_jpegs_smaller_but_not_below_it(tmp_path):
    path = tmp_path / "large.jpg"
    _noise_image(640, 480).save(path)
    image = decode_image(path, draft_size=100)
    assert min(image.size) >= 100 and image.size[0] < 640
