"""Tests of cache-time preprocessing and the per-sample train and eval tensor transforms."""

import numpy as np
import pytest
import torch
from PIL import Image

from shared.config import PreprocessConfig
from shared.data.transforms import (
    ColourJitter,
    RandomRotatedResizedCrop,
    build_eval_transform,
    build_train_transform,
    clahe,
    preprocess_image,
    resize_and_centre_crop,
    shades_of_gray,
)
from shared.errors import ModelError

from torchvision.transforms import v2  # isort: skip - after `shared`, which makes torchvision importable

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth skin-like texture with some noise, uint8 HWC."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:height, 0:width]
    base = 120 + 50 * np.sin(columns / 7.0)[..., None] * np.cos(rows / 5.0)[..., None]
    return np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)


def _chw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(2, 0, 1)


@pytest.mark.parametrize("width,height", [(40, 30), (30, 40), (20, 12)])
def test_resize_and_centre_crop_gives_square_uint8(width, height):
    array = resize_and_centre_crop(Image.fromarray(_texture(height, width)), 32)
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8


def test_centre_crop_keeps_the_middle_of_a_wide_image():
    pixels = np.zeros((30, 90, 3), dtype=np.uint8)
    pixels[:, :30, 0] = 255  # red left third
    pixels[:, 30:60, 1] = 255  # green middle third
    pixels[:, 60:, 2] = 255  # blue right third
    array = resize_and_centre_crop(Image.fromarray(pixels), 32)
    means = array[:, 4:-4].reshape(-1, 3).mean(axis=0)
    assert means[1] > 240 and means[0] < 15 and means[2] < 15


def test_shades_of_gray_removes_a_colour_cast():
    cast = np.clip(_texture(48, 48).astype(float) * [1.4, 1.0, 0.6], 0, 255).astype(np.uint8)
    corrected = shades_of_gray(cast)
    assert corrected.dtype == np.uint8 and corrected.shape == cast.shape
    spread_before = np.ptp(cast.reshape(-1, 3).mean(axis=0))
    spread_after = np.ptp(corrected.reshape(-1, 3).mean(axis=0))
    assert spread_after < 0.3 * spread_before


def test_shades_of_gray_leaves_grey_and_black_images_alone():
    grey = np.full((16, 16, 3), 90, dtype=np.uint8)
    assert np.abs(shades_of_gray(grey).astype(int) - 90).max() <= 1
    black = np.zeros((16, 16, 3), dtype=np.uint8)
    assert np.array_equal(shades_of_gray(black), black)


def test_clahe_increases_the_contrast_of_a_flat_image():
    flat = (115 + (_texture(64, 64).astype(float) - 120) * 0.15).astype(np.uint8)
    equalised = clahe(flat)
    assert equalised.dtype == np.uint8 and equalised.shape == flat.shape
    assert equalised.mean(axis=2).std() > 2 * flat.mean(axis=2).std()


def test_preprocess_image_applies_the_configured_steps():
    image = Image.fromarray(np.clip(_texture(30, 40).astype(float) * [1.3, 1.0, 0.7], 0, 255).astype(np.uint8))
    plain = preprocess_image(image, PreprocessConfig(image_size=32))
    corrected = preprocess_image(image, PreprocessConfig(image_size=32, colour_constancy=True, clahe=True))
    assert plain.shape == corrected.shape == (32, 32, 3)
    assert not np.array_equal(plain, corrected)


def _normalised_bounds() -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


def test_train_transform_gives_normalised_float_images_that_vary():
    transform = build_train_transform(MEAN, STD)
    image = _chw(_texture(48, 48))
    outputs = [transform(image) for _ in range(4)]
    low, high = _normalised_bounds()
    for output in outputs:
        assert output.shape == (3, 48, 48) and output.dtype == torch.float32
        assert torch.all(output >= low - 1e-4) and torch.all(output <= high + 1e-4)
        assert torch.isfinite(output).all()
    assert not torch.allclose(outputs[0], outputs[1])


def test_train_transform_is_reproducible_under_a_seed():
    transform, image = build_train_transform(MEAN, STD), _chw(_texture(32, 32))
    torch.manual_seed(7)
    first = transform(image)
    torch.manual_seed(7)
    assert torch.equal(first, transform(image))


def test_rotation_fills_corners_with_mirrored_content_not_black():
    uniform = _chw(np.full((40, 40, 3), 150, dtype=np.uint8))
    warp = RandomRotatedResizedCrop()
    for _ in range(10):
        warped = warp(uniform)
        assert warped.shape == (3, 40, 40) and warped.dtype == torch.uint8
        assert int(warped.min()) == 150 == int(warped.max())


def test_rotation_and_crop_change_the_layout():
    image = _chw(_texture(40, 40))
    assert not torch.equal(RandomRotatedResizedCrop()(image), image)


def test_colour_jitter_without_strength_is_the_identity_and_with_it_changes_colours():
    image = _chw(_texture(32, 32))
    assert torch.equal(ColourJitter(0, 0, 0, 0)(image), image)
    jittered = ColourJitter(0.2, 0.2, 0.2, 0.02)(image)
    assert jittered.dtype == torch.uint8 and not torch.equal(jittered, image)


def test_eval_transform_is_deterministic_and_matches_torchvision_normalisation():
    transform, image = build_eval_transform(MEAN, STD), _chw(_texture(32, 32))
    expected = v2.Normalize(list(MEAN), list(STD))(v2.ToDtype(torch.float32, scale=True)(image))
    first = transform(image)
    assert torch.equal(first, transform(image))
    assert torch.allclose(first, expected, atol=1e-5)


def test_train_transform_without_augmentation_is_the_eval_transform():
    image = _chw(_texture(32, 32))
    assert torch.equal(build_train_transform(MEAN, STD, augment=False)(image), build_eval_transform(MEAN, STD)(image))


def test_normalisation_needs_three_channels():
    with pytest.raises(ModelError, match="three values.*RGB"):
        build_eval_transform([0.5], [0.5])
