"""Image preprocessing done once at cache time, and the per-sample train and eval tensor transforms."""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
import torch
from PIL import Image
from torch import nn

from shared.config import PreprocessConfig
from shared.errors import ModelError

from torchvision.transforms import v2  # isort: skip - after `shared`, which makes torchvision importable


def resize_and_centre_crop(image: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to `size` (Lanczos) and centre-crop to a uint8 `size`x`size`x3 array."""
    width, height = image.size
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    # reducing_gap first box-reduces very large photographs, then Lanczos does the last step.
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    resized = rgb.resize((new_width, new_height), Image.Resampling.LANCZOS, reducing_gap=3.0)
    left, top = (new_width - size) // 2, (new_height - size) // 2
    cropped = resized.crop((left, top, left + size, top + size))
    return np.asarray(cropped, dtype=np.uint8).copy()


def shades_of_gray(image: np.ndarray, power: int = 6) -> np.ndarray:
    """Shades-of-Gray colour constancy (Finlayson & Trezzi): divide out the Minkowski p-norm illuminant."""
    pixels = image.astype(np.float32)
    illuminant = np.power(np.mean(np.power(pixels, power), axis=(0, 1)), 1.0 / power)
    norm = float(np.sqrt(np.sum(illuminant**2)))
    if norm == 0.0:
        return image.copy()  # an all-black image has no illuminant to correct
    # Scale so a grey illuminant (equal channels) leaves the image unchanged.
    gains = 1.0 / (np.maximum(illuminant / norm, 1e-6) * math.sqrt(3.0))
    return np.clip(pixels * gains, 0, 255).astype(np.uint8)


def clahe(image: np.ndarray, clip_limit: float = 2.0, tile_grid: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of the lightness channel (LAB) of an RGB image."""
    lab = cv2.cvtColor(np.ascontiguousarray(image, dtype=np.uint8), cv2.COLOR_RGB2LAB)
    equaliser = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile_grid, tile_grid))
    lab[:, :, 0] = equaliser.apply(np.ascontiguousarray(lab[:, :, 0]))
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def preprocess_image(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """The cached form of one decoded image: resized, centre-cropped, optionally colour-corrected."""
    array = resize_and_centre_crop(image, config.image_size)
    if config.colour_constancy:
        array = shades_of_gray(array)
    if config.clahe:
        array = clahe(array)
    return array


_GREY_WEIGHTS = np.array([0.299, 0.587, 0.114])
"""ITU-R 601 luma weights, as torchvision's greyscale conversion uses."""
_GREY_ROWS = np.outer(np.ones(3), _GREY_WEIGHTS)
"""Maps every pixel to its grey value in all three channels."""
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def _hwc_array(image: torch.Tensor) -> np.ndarray:
    """A CHW tensor as a C-contiguous HWC array (no copy when its memory is already HWC, as cached images are)."""
    return np.ascontiguousarray(image.permute(1, 2, 0).numpy())


def _chw_tensor(pixels: np.ndarray) -> torch.Tensor:
    """An HWC array as a CHW tensor view of the same memory."""
    return torch.from_numpy(pixels).permute(2, 0, 1)


class RandomRotatedResizedCrop(nn.Module):
    """Flips, rotation by any angle and a random resized crop of a uint8 CHW image, as one warp.

    Dermoscopy has no canonical orientation, so every angle is drawn; the corners a rotation
    uncovers are filled by mirroring the skin around them rather than with black wedges, and
    one bilinear resampling does the work of four separate transforms.
    """

    def __init__(
        self,
        scale: tuple[float, float] = (0.7, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_probability: float = 0.5,
    ) -> None:
        super().__init__()
        self.scale = scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.flip_probability = flip_probability

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """A randomly flipped, rotated and cropped view of `image`, resized back to its size."""
        pixels = _hwc_array(image)
        height, width = pixels.shape[:2]
        # torch's generator, so torch.manual_seed and DataLoader worker seeding govern it.
        area_draw, ratio_draw, x_draw, y_draw, angle_draw, flip_x_draw, flip_y_draw = torch.rand(7).tolist()
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * area_draw
        aspect = math.exp(self.log_ratio[0] + (self.log_ratio[1] - self.log_ratio[0]) * ratio_draw)
        crop_width, crop_height = min(1.0, math.sqrt(area * aspect)), min(1.0, math.sqrt(area / aspect))
        flip_x = -1.0 if flip_x_draw < self.flip_probability else 1.0
        flip_y = -1.0 if flip_y_draw < self.flip_probability else 1.0
        cos, sin = math.cos(2 * math.pi * angle_draw), math.sin(2 * math.pi * angle_draw)
        # Output pixel -> input pixel: about the centre, scale by the crop (and flip), rotate,
        # then move to a crop centre anywhere the unrotated crop would fit.
        centre_x, centre_y = (width - 1) / 2, (height - 1) / 2
        source_x = centre_x + (1.0 - crop_width) * (2 * x_draw - 1) * width / 2
        source_y = centre_y + (1.0 - crop_height) * (2 * y_draw - 1) * height / 2
        linear = np.array(
            [
                [cos * crop_width * flip_x, -sin * crop_height * flip_y],
                [sin * crop_width * flip_x, cos * crop_height * flip_y],
            ]
        )
        shift = np.array([source_x, source_y]) - linear @ np.array([centre_x, centre_y])
        matrix = np.hstack([linear, shift[:, None]]).astype(np.float32)
        warped = cv2.warpAffine(
            pixels,
            matrix,
            (width, height),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REFLECT_101,
        )
        return _chw_tensor(warped)


class ColourJitter(nn.Module):
    """Random brightness, contrast, saturation and hue of a uint8 CHW image, in random order.

    The four operations are linear in RGB (hue as a rotation of the YIQ chroma plane), so
    they compose into one colour matrix applied in a single pass; clipping happens once at
    the end instead of after every step.
    """

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float) -> None:
        super().__init__()
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """`image` with randomly jittered colours, uint8 CHW."""
        pixels = _hwc_array(image)
        brightness_draw, contrast_draw, saturation_draw, hue_draw = torch.rand(4).tolist()
        # Homogeneous 4x4 colour transform: [R, G, B, 1] -> [R', G', B', 1].
        colour = np.eye(4)
        for operation in torch.randperm(4).tolist():
            step = np.eye(4)
            if operation == 0:
                factor = 1 + self.brightness * (2 * brightness_draw - 1)
                step[:3, :3] *= factor
            elif operation == 1:
                factor = 1 + self.contrast * (2 * contrast_draw - 1)
                # Contrast blends towards the mean grey of the image as it is at this step.
                mean_grey = _GREY_WEIGHTS @ (colour[:3] @ [*cv2.mean(pixels)[:3], 1.0])
                step[:3, :3] *= factor
                step[:3, 3] = (1 - factor) * mean_grey
            elif operation == 2:
                factor = 1 + self.saturation * (2 * saturation_draw - 1)
                step[:3, :3] = factor * step[:3, :3] + (1 - factor) * _GREY_ROWS
            else:
                angle = 2 * math.pi * self.hue * (2 * hue_draw - 1)
                cos, sin = math.cos(angle), math.sin(angle)
                step[:3, :3] = _YIQ_TO_RGB @ np.array([[1, 0, 0], [0, cos, sin], [0, -sin, cos]]) @ _RGB_TO_YIQ
            colour = step @ colour
        return _chw_tensor(cv2.transform(pixels, colour[:3].astype(np.float32)))


class NormaliseToFloat(nn.Module):
    """uint8 CHW image -> float32 CHW tensor, scaled to [0, 1] and normalised by mean and std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_values, std_values = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
        if mean_values.shape != (3,) or std_values.shape != (3,) or not np.all(std_values > 0):
            raise ModelError(
                f"normalisation mean {list(mean)} and std {list(std)} must be three values each with std > 0; "
                "use an RGB (3-channel) timm model"
            )
        scale = 1.0 / (255.0 * std_values)
        # One pass computes (pixel / 255 - mean) / std for every channel.
        self._matrix = np.hstack([np.diag(scale), (-mean_values / std_values)[:, None]]).astype(np.float32)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """The normalised float32 CHW tensor of `image`."""
        pixels = _hwc_array(image).astype(np.float32)
        return _chw_tensor(cv2.transform(pixels, self._matrix))


def build_eval_transform(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """uint8 CHW tensor -> float32 tensor normalised with the model's mean and std."""
    return v2.Compose([NormaliseToFloat(mean, std)])


def build_train_transform(mean: Sequence[float], std: Sequence[float], *, augment: bool = True) -> v2.Compose:
    """uint8 CHW tensor -> flipped, rotated, cropped, colour-jittered and normalised float32 tensor."""
    if not augment:
        return build_eval_transform(mean, std)
    return v2.Compose(
        [
            RandomRotatedResizedCrop(scale=(0.7, 1.0)),
            ColourJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
            NormaliseToFloat(mean, std),
        ]
    )
