"""DiffAugment: each augmentation keeps shapes, moves gradients through, and does exactly what it says."""

import pytest
import torch

from shared.gan.diff_augment import diff_augment, random_colour, random_cutout, random_translation


def _images(count: int = 4, size: int = 16) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_every_policy_keeps_the_shape_and_passes_gradients_to_the_images():
    images = _images().requires_grad_(True)
    augmented = diff_augment(images, ["color", "translation", "cutout"], torch.Generator().manual_seed(0))
    assert augmented.shape == images.shape
    augmented.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_translation_moves_whole_pixels_and_fills_with_zeros():
    images = torch.ones(64, 1, 16, 16)
    shifted = random_translation(images, torch.Generator().manual_seed(0))
    zero_rows = (shifted[:, 0] == 0).all(dim=2).sum(dim=1)
    zero_columns = (shifted[:, 0] == 0).all(dim=1).sum(dim=1)
    assert set(shifted.unique().tolist()) <= {0.0, 1.0}
    assert zero_rows.max() <= 2 and zero_columns.max() <= 2  # at most 1/8 of 16 pixels each way
    assert (zero_rows + zero_columns).sum() > 0  # some image moved
    # The content is shifted, not resampled: one image's non-zero block is a rectangle of ones.
    assert torch.equal(shifted.sum(dim=(1, 2, 3)), ((16 - zero_rows) * (16 - zero_columns)).float())


def test_cutout_zeroes_one_square_of_half_the_side_at_most():
    images = torch.ones(32, 3, 16, 16)
    cut = random_cutout(images, torch.Generator().manual_seed(0))
    zeroed = (cut[:, 0] == 0).sum(dim=(1, 2))
    assert zeroed.max() == 64 and zeroed.min() > 0  # 8 x 8 inside, less where it overlaps the border
    assert torch.equal(cut[:, 0], cut[:, 2])  # the same square in every channel


def test_colour_changes_each_image_differently_and_the_same_generator_seed_repeats_it():
    images = _images(8)
    first = random_colour(images, torch.Generator().manual_seed(3))
    again = random_colour(images, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    shifts = (first - images).mean(dim=(1, 2, 3))
    assert shifts.std() > 0.01


def test_no_policy_is_the_identity_and_an_unknown_one_names_the_choices():
    images = _images()
    assert torch.equal(diff_augment(images, [], torch.Generator()), images)
    with pytest.raises(ValueError, match="color, translation, cutout"):
        diff_augment(images, ["blur"], torch.Generator())
