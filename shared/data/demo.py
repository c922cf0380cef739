"""The built-in demo dataset: procedural dermoscopy-like images written in the real on-disk formats.

Every class has its own lesion shape, colours, border and texture (after the dermoscopic
features clinicians look for), drawn with random size, position, colour and skin tone, so a
classifier can learn the classes but not from one trivial cue. Nothing is downloaded.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageEnhance

from shared.data.ham10000 import HAM10000_CLASSES
from shared.data.isic2019 import ISIC2019_CLASS_MAP
from shared.errors import ConfigError

DEMO_VERSION = 1
"""Bump when the images or files change, so cached demo datasets are rewritten."""

HAM_LIKE_PROPORTIONS = {"nv": 0.67, "mel": 0.11, "bkl": 0.11, "bcc": 0.05, "akiec": 0.033, "vasc": 0.014, "df": 0.011}
"""Class shares of HAM10000, which the demo copies so class imbalance is as real as the images allow."""

DEMO_FORMATS = ("ham10000", "isic2019", "isic2020", "folder")
JPEG_QUALITY = 90
SECOND_IMAGE_PROBABILITY = 0.2
"""Share of demo lesions photographed twice, as some HAM10000 lesions are."""

_SKIN_TONES = ((228, 178, 150), (215, 160, 128), (236, 196, 172), (200, 145, 110))
_LOCALIZATIONS = ("back", "lower extremity", "trunk", "upper extremity", "abdomen", "face", "chest", "scalp")
_ISIC2019_SITES = ("anterior torso", "lower extremity", "upper extremity", "posterior torso", "head/neck")
_ISIC2020_DIAGNOSIS = {"mel": "melanoma", "nv": "nevus", "bkl": "seborrheic keratosis"}


@dataclass(frozen=True)
class _LesionStyle:
    """Geometry of one class: radius as a fraction of the shorter image side, border harmonics, softness."""

    radius: tuple[float, float]
    harmonics: tuple[tuple[int, float, float], ...]
    edge_pixels: float


_STYLES = {
    "nv": _LesionStyle((0.20, 0.30), ((2, 0.04, 0.14),), 1.5),
    "mel": _LesionStyle((0.27, 0.38), ((1, 0.08, 0.18), (2, 0.08, 0.18), (3, 0.05, 0.12), (5, 0.03, 0.08), (8, 0.02, 0.05)), 2.5),
    "bcc": _LesionStyle((0.20, 0.30), ((2, 0.05, 0.12), (3, 0.02, 0.06)), 5.0),
    "akiec": _LesionStyle((0.20, 0.30), ((2, 0.05, 0.12), (4, 0.03, 0.07), (7, 0.02, 0.04)), 3.0),
    "bkl": _LesionStyle((0.22, 0.33), ((2, 0.05, 0.14), (3, 0.03, 0.07)), 1.2),
    "df": _LesionStyle((0.12, 0.19), ((2, 0.03, 0.10),), 4.0),
    "vasc": _LesionStyle((0.14, 0.23), ((2, 0.03, 0.08),), 2.0),
}


def _jitter(rng: np.random.Generator, colour: tuple[float, float, float], spread: float) -> np.ndarray:
    """A channel-first (3, 1, 1) colour varied mostly in brightness, a little in hue, so browns stay brown."""
    brightness = 1 + rng.normal(0, spread / 150)
    varied = np.asarray(colour, np.float32) * brightness + rng.normal(0, spread / 3, 3)
    return np.clip(varied, 0, 255).astype(np.float32).reshape(3, 1, 1)


@functools.lru_cache(maxsize=8)
def _pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel x and y coordinates and each pixel's distance from the image centre (read-only)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    from_middle = np.hypot(x - width / 2, y - height / 2)
    for array in (x, y, from_middle):
        array.flags.writeable = False
    return x, y, from_middle


def _gaussian(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)


def _pixel(point: np.ndarray) -> tuple[int, int]:
    return int(round(float(point[0]))), int(round(float(point[1])))


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Noise of roughly `cells` blobs across the shorter side, about in [-1, 1]."""
    rows = max(2, cells)
    columns = max(2, round(cells * width / height))
    coarse = rng.uniform(-1, 1, size=(rows, columns)).astype(np.float32)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)


def _random_curve(rng: np.random.Generator, start: np.ndarray, end: np.ndarray, bend: float) -> np.ndarray:
    """Points of a quadratic Bezier curve from start to end, bent sideways by up to `bend` pixels."""
    middle = (start + end) / 2 + rng.uniform(-bend, bend, 2)
    steps = np.linspace(0, 1, 24)[:, None]
    points = (1 - steps) ** 2 * start + 2 * (1 - steps) * steps * middle + steps**2 * end
    return points.round().astype(np.int32)


def _branching_vessels(rng: np.random.Generator, mask: np.ndarray, centre: np.ndarray, radius: float) -> None:
    """Draw arborising vessels (the BCC hallmark): random walks that fork and thin out."""
    for _ in range(rng.integers(2, 5)):
        angle = rng.uniform(0, 2 * math.pi)
        start = centre + rng.uniform(0, 0.6 * radius) * np.array([math.cos(angle), math.sin(angle)])
        branches = [(start, rng.uniform(0, 2 * math.pi), 2)]
        while branches:
            point, direction, thickness = branches.pop()
            for _ in range(rng.integers(3, 7)):
                direction += rng.normal(0, 0.45)
                step = rng.uniform(3, 7) * np.array([math.cos(direction), math.sin(direction)])
                following = point + step
                cv2.line(mask, _pixel(point), _pixel(following), 1.0, thickness, cv2.LINE_AA)
                point = following
                if thickness > 1 and rng.random() < 0.35:
                    branches.append((point, direction + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1), thickness - 1))


def _blend(image: np.ndarray, colour: np.ndarray, weight: np.ndarray) -> None:
    """Mix `colour` into a channel-first image in place, by a per-pixel weight in [0, 1]."""
    image += (colour - image) * weight


def _lesion_colours(label: str, rng: np.random.Generator, grid: dict) -> tuple[np.ndarray, float]:
    """The lesion's channel-first colour at every pixel and its opacity, for one class."""
    relative, xx, yy = grid["relative"], grid["x"], grid["y"]
    height, width = relative.shape
    if label == "nv":
        colour = _jitter(rng, (125, 80, 50), 14) * (0.85 + 0.15 * relative)
        period = rng.uniform(5, 7)
        network = np.abs(np.sin(xx * (math.pi / period)) * np.sin(yy * (math.pi / period)))
        colour *= 1 - 0.07 * (network < 0.25)
        return colour, rng.uniform(0.8, 0.95)
    if label == "mel":
        colour = np.broadcast_to(_jitter(rng, (85, 50, 32), 10), (3, height, width)).copy()
        _blend(colour, _jitter(rng, (35, 25, 25), 6), np.clip(_smooth_noise(rng, height, width, 4) * 1.6 + 0.1, 0, 1))
        _blend(colour, _jitter(rng, (105, 115, 135), 10), np.clip(_smooth_noise(rng, height, width, 3) * 1.6 - 0.2, 0, 1))
        # An irregular network: the grid is warped by noise and its lines vary in width.
        period = rng.uniform(4, 8)
        warp_x = _smooth_noise(rng, height, width, 6) * 10
        warp_y = _smooth_noise(rng, height, width, 6) * 10
        network = np.abs(np.sin((xx + warp_x) * (math.pi / period)) * np.sin((yy + warp_y) * (1.3 * math.pi / period)))
        colour *= 1 - 0.28 * (network < 0.3 + 0.2 * _smooth_noise(rng, height, width, 3))
        return colour, rng.uniform(0.88, 1.0)
    if label == "bcc":
        colour = np.broadcast_to(_jitter(rng, (228, 150, 155), 10), (3, height, width)).copy()
        _blend(colour, np.float32(245), 0.4 * np.clip(_smooth_noise(rng, height, width, 3), 0, 1))
        return colour, rng.uniform(0.45, 0.65)
    if label == "akiec":
        roughness = cv2.GaussianBlur(_gaussian(rng, (height, width), 1), (0, 0), 0.8)
        colour = _jitter(rng, (195, 105, 95), 12) * (1 + 0.12 * roughness)
        _blend(colour, _jitter(rng, (238, 226, 208), 6), np.clip((roughness - 0.9) * 2.5, 0, 1))
        return colour, rng.uniform(0.7, 0.85)
    if label == "bkl":
        colour = _jitter(rng, (175, 130, 88), 12) * (1 + 0.06 * _smooth_noise(rng, height, width, 6))
        cracks = np.zeros((height, width), np.float32)
        for _ in range(rng.integers(3, 8)):
            start = grid["centre"] + rng.uniform(-1, 1, 2) * grid["radius"] * 0.8
            end = start + rng.uniform(-1, 1, 2) * grid["radius"] * 0.8
            cv2.polylines(cracks, [_random_curve(rng, start, end, 6)], False, 1.0, 1, cv2.LINE_AA)
        _blend(colour, _jitter(rng, (100, 70, 48), 6), 0.45 * cracks)
        milia = np.zeros((height, width), np.float32)
        for _ in range(rng.integers(3, 11)):
            spot = grid["centre"] + rng.uniform(-0.7, 0.7, 2) * grid["radius"]
            cv2.circle(milia, _pixel(spot), int(rng.integers(1, 3)), 1.0, -1, cv2.LINE_AA)
        _blend(colour, _jitter(rng, (240, 234, 200), 4), milia)
        return colour, rng.uniform(0.8, 0.92)
    if label == "df":
        ring, centre = _jitter(rng, (140, 95, 65), 12), _jitter(rng, (232, 208, 192), 8)
        to_ring = np.clip((relative - rng.uniform(0.15, 0.3)) / 0.45, 0, 1)
        return centre + (ring - centre) * to_ring, rng.uniform(0.8, 0.92)
    if label == "vasc":
        base = _jitter(rng, (175, 60, 85) if rng.random() < 0.6 else (140, 60, 110), 12)
        lacuna = _jitter(rng, (110, 20, 50) if rng.random() < 0.6 else (85, 30, 90), 10)
        lacunae = np.zeros((height, width), np.float32)
        for _ in range(rng.integers(5, 14)):
            spot = grid["centre"] + rng.uniform(-0.75, 0.75, 2) * grid["radius"]
            cv2.circle(lacunae, _pixel(spot), int(rng.integers(2, 6)), 1.0, -1, cv2.LINE_AA)
        return base + (lacuna - base) * cv2.GaussianBlur(lacunae, (0, 0), 0.8), rng.uniform(0.85, 0.95)
    raise ConfigError(f"no demo drawing for class {label!r}; use one of {', '.join(HAM10000_CLASSES)}")


def render_lesion(label: str, rng: np.random.Generator, width: int = 200, height: int = 150) -> Image.Image:
    """Draw one dermoscopy-like RGB image of a lesion of the given HAM10000 class."""
    if label not in _STYLES:
        raise ConfigError(f"no demo drawing for class {label!r}; use one of {', '.join(HAM10000_CLASSES)}")
    style = _STYLES[label]
    shape = (height, width)
    # Channel-first, so per-pixel weights broadcast over whole rows rather than over 3 channels.
    skin = _jitter(rng, _SKIN_TONES[rng.integers(len(_SKIN_TONES))], 6)
    image = skin + _smooth_noise(rng, height, width, 4) * rng.uniform(5, 12) + _gaussian(rng, shape, 3)

    shorter = min(width, height)
    centre = np.array([width / 2 + rng.normal(0, 0.07) * width, height / 2 + rng.normal(0, 0.07) * height], np.float32)
    radius = shorter * rng.uniform(*style.radius)
    x, y, from_middle = _pixel_grid(height, width)
    angle = np.arctan2(y - centre[1], x - centre[0])
    distance = np.hypot(x - centre[0], y - centre[1])
    # The border radius is a Fourier series over the angle: low harmonics make ovals, high ones
    # the notched, asymmetric outline of a melanoma.
    border = np.ones(shape, np.float32)
    for harmonic, low, high in style.harmonics:
        border += rng.uniform(low, high) * np.cos(harmonic * angle + rng.uniform(0, 2 * math.pi))
    border *= radius
    inside = np.clip((border - distance) / style.edge_pixels, 0, 1)
    grid = {"x": x, "y": y, "relative": np.clip(distance / border, 0, 1), "centre": centre, "radius": radius}
    colour, opacity = _lesion_colours(label, rng, grid)
    _blend(image, colour, inside * np.float32(opacity))

    if label == "bcc":
        vessels = np.zeros(shape, np.float32)
        _branching_vessels(rng, vessels, centre, radius)
        _blend(image, _jitter(rng, (170, 25, 35), 8), 0.85 * vessels * inside)

    if rng.random() < 0.35:
        hairs = np.zeros(shape, np.float32)
        for _ in range(rng.integers(1, 5)):
            start = rng.uniform(0, 1, 2) * (width, height)
            end = rng.uniform(0, 1, 2) * (width, height)
            cv2.polylines(hairs, [_random_curve(rng, start, end, 25)], False, 1.0, 1, cv2.LINE_AA)
        _blend(image, _jitter(rng, (45, 32, 25), 5), 0.8 * hairs)

    image *= rng.uniform(0.94, 1.06, (3, 1, 1)).astype(np.float32)
    # The dermoscope's round field of view leaves the corners dark.
    field_radius = 0.5 * math.hypot(width, height) * rng.uniform(0.8, 0.93)
    _blend(image, np.float32(12), np.clip((from_middle - field_radius) / (0.03 * shorter), 0, 1))
    image += _gaussian(rng, shape, 2)
    pixels = np.clip(image, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


def _class_counts(num_images: int, min_per_class: int) -> dict[str, int]:
    """Images per class: HAM10000 shares, at least `min_per_class` each, the largest class takes the rest."""
    needed = min_per_class * len(HAM_LIKE_PROPORTIONS)
    if num_images < needed:
        raise ConfigError(
            f"a demo dataset of {num_images} images cannot hold {min_per_class} images of each of "
            f"{len(HAM_LIKE_PROPORTIONS)} classes; ask for at least {needed} images"
        )
    largest = max(HAM_LIKE_PROPORTIONS, key=HAM_LIKE_PROPORTIONS.get)
    counts = {label: max(min_per_class, int(share * num_images)) for label, share in HAM_LIKE_PROPORTIONS.items()}
    counts[largest] = num_images - sum(count for label, count in counts.items() if label != largest)
    return counts


@dataclass
class _DemoImage:
    """One image of the demo: its index, class, lesion, site, and the seed its pixels come from."""

    index: int
    label: str
    lesion: int
    site: int
    seed: int
    view: int


def _plan_images(num_images: int, num_sites: int, seed: int, min_per_class: int) -> list[_DemoImage]:
    """Which class, lesion and site every image has; lesions are dealt to sites in turn."""
    rng = np.random.default_rng(seed)
    lesions: list[tuple[str, int]] = []
    for label, count in _class_counts(num_images, min_per_class).items():
        remaining = count
        while remaining:
            views = 2 if remaining >= 2 and rng.random() < SECOND_IMAGE_PROBABILITY else 1
            lesions.append((label, views))
            remaining -= views
    order = rng.permutation(len(lesions))
    lesion_seeds = rng.integers(0, 2**63 - 1, size=len(lesions))
    plan = []
    for lesion, position in enumerate(order):
        label, views = lesions[position]
        for view in range(views):
            plan.append(_DemoImage(len(plan), label, lesion, lesion % num_sites, int(lesion_seeds[lesion]), view))
    return plan


def _draw(image: _DemoImage, width: int, height: int) -> Image.Image:
    """The pixels of a planned image; a lesion's second view is its first, turned and re-exposed."""
    rng = np.random.default_rng(image.seed)
    picture = render_lesion(image.label, rng, width, height)
    if image.view == 0:
        return picture
    turn = (Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_180)
    picture = picture.transpose(turn[rng.integers(len(turn))])
    return ImageEnhance.Brightness(picture).enhance(rng.uniform(0.88, 1.12))


def _write_csv(path: Path, columns: list[str], rows: list[list]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)


def _write_ham10000(root: Path, plan: list[_DemoImage], layout: str, pictures: Iterable[Image.Image]) -> None:
    rng = np.random.default_rng([len(plan), 1])
    rows = []
    for image, picture in zip(plan, pictures):
        image_id = f"ISIC_{24306 + image.index:07d}"
        if layout == "parts":
            folder = root / ("HAM10000_images_part_1" if image.index < len(plan) / 2 else "HAM10000_images_part_2")
        else:
            folder = root / "images"
        folder.mkdir(exist_ok=True)
        picture.save(folder / f"{image_id}.jpg", quality=JPEG_QUALITY)
        dx_type = "histo" if image.label in ("mel", "bcc", "akiec") else str(rng.choice(["follow_up", "histo", "consensus"]))
        rows.append([
            f"HAM_{image.lesion:07d}", image_id, image.label, dx_type, f"{5 * rng.integers(4, 18)}.0",
            str(rng.choice(["male", "female"])), str(rng.choice(_LOCALIZATIONS)), f"demo_clinic_{image.site + 1}",
        ])
    columns = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"]
    _write_csv(root / "HAM10000_metadata.csv", columns, rows)


def _write_isic2019(root: Path, plan: list[_DemoImage], pictures: Iterable[Image.Image]) -> None:
    rng = np.random.default_rng([len(plan), 2])
    folder = root / "ISIC_2019_Training_Input"
    folder.mkdir()
    truth_rows, metadata_rows = [], []
    for image, picture in zip(plan, pictures):
        image_id = f"ISIC_{image.index:07d}"
        picture.save(folder / f"{image_id}.jpg", quality=JPEG_QUALITY)
        one_hot = ["1.0" if mapped == image.label else "0.0" for mapped in ISIC2019_CLASS_MAP.values()]
        truth_rows.append([image_id, *one_hot, "0.0"])
        metadata_rows.append([
            image_id, f"{5 * rng.integers(4, 18)}.0", str(rng.choice(_ISIC2019_SITES)),
            f"DEMO{image.site + 1}_{image.lesion:07d}", str(rng.choice(["male", "female"])),
        ])
    _write_csv(root / "ISIC_2019_Training_GroundTruth.csv", ["image", *ISIC2019_CLASS_MAP, "UNK"], truth_rows)
    metadata_columns = ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"]
    _write_csv(root / "ISIC_2019_Training_Metadata.csv", metadata_columns, metadata_rows)


def _write_isic2020(root: Path, plan: list[_DemoImage], pictures: Iterable[Image.Image]) -> None:
    rng = np.random.default_rng([len(plan), 3])
    folder = root / "train"
    folder.mkdir()
    rows = []
    for image, picture in zip(plan, pictures):
        image_id = f"ISIC_{image.index:07d}"
        picture.save(folder / f"{image_id}.jpg", quality=JPEG_QUALITY)
        malignant = image.label == "mel"
        rows.append([
            image_id, f"IP_{image.lesion:07d}", str(rng.choice(["male", "female"])), f"{5 * rng.integers(4, 18)}.0",
            str(rng.choice(_ISIC2019_SITES)), _ISIC2020_DIAGNOSIS.get(image.label, "unknown"),
            "malignant" if malignant else "benign", int(malignant),
        ])
    columns = ["image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge"]
    columns += ["diagnosis", "benign_malignant", "target"]
    _write_csv(root / "train.csv", columns, rows)


def _write_folder(root: Path, plan: list[_DemoImage], pictures: Iterable[Image.Image]) -> None:
    rows = []
    for image, picture in zip(plan, pictures):
        folder = root / image.label
        folder.mkdir(exist_ok=True)
        name = f"img_{image.index:05d}.jpg"
        picture.save(folder / name, quality=JPEG_QUALITY)
        rows.append([f"{image.label}/{name}", f"lesion_{image.lesion:05d}"])
    _write_csv(root / "groups.csv", ["image", "group"], rows)


def write_demo_dataset(
    root: Path,
    *,
    format: str = "ham10000",
    num_images: int = 700,
    num_sites: int = 3,
    seed: int = 0,
    layout: str = "single",
    min_per_class: int = 8,
    width: int = 200,
    height: int = 150,
) -> Path:
    """Write a complete demo dataset in a real on-disk format into an empty or new folder.

    ham10000 names the `num_sites` sites `demo_clinic_N` in its `dataset` column and isic2019 in
    the `DEMO<N>_` prefix of its lesion ids; isic2020 turns mel into malignant and the rest benign.
    `layout` "parts" spreads HAM10000 images over the two-part download's folders.
    """
    if format not in DEMO_FORMATS:
        raise ConfigError(f"unknown demo format {format!r}; use one of {', '.join(DEMO_FORMATS)}")
    if layout not in ("single", "parts") or (layout == "parts" and format != "ham10000"):
        raise ConfigError(f"layout {layout!r} is not available for {format}; use 'single' ('parts' is for ham10000)")
    if num_sites < 1:
        raise ConfigError(f"num_sites {num_sites} must be at least 1")
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ConfigError(f"{root} is not an empty folder; give a new or empty folder for the demo dataset")
    plan = _plan_images(num_images, num_sites, seed, min_per_class)
    root.mkdir(parents=True, exist_ok=True)
    pictures = (_draw(image, width, height) for image in plan)
    if format == "ham10000":
        _write_ham10000(root, plan, layout, pictures)
    elif format == "isic2019":
        _write_isic2019(root, plan, pictures)
    elif format == "isic2020":
        _write_isic2020(root, plan, pictures)
    else:
        _write_folder(root, plan, pictures)
    return root


def ensure_demo_dataset(cache_root: Path, *, num_images: int = 700, num_sites: int = 3, seed: int = 0) -> Path:
    """The HAM10000-format demo dataset under `cache_root`, written only when missing or outdated."""
    cache_root = Path(cache_root)
    target = cache_root / "ham10000"
    stamp = {"demo_version": DEMO_VERSION, "num_images": num_images, "num_sites": num_sites, "seed": seed}
    stamp_path = target / "demo.json"
    if _stamp_matches(stamp_path, stamp):
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    # Written next to the target and renamed into place, so no reader sees a half-written dataset.
    staging = Path(tempfile.mkdtemp(prefix=".demo-writing-", dir=cache_root))
    try:
        write_demo_dataset(staging, num_images=num_images, num_sites=num_sites, seed=seed)
        (staging / "demo.json").write_text(json.dumps(stamp, indent=2) + "\n")
        if target.exists():
            outdated = Path(tempfile.mkdtemp(prefix=".demo-outdated-", dir=cache_root))
            target.rename(outdated / "ham10000")
            shutil.rmtree(outdated)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _stamp_matches(stamp_path: Path, stamp: dict) -> bool:
    try:
        return json.loads(stamp_path.read_text()) == stamp
    except (OSError, ValueError):
        return False
