"""Synthetic minority-class images for one site: how many, generate and select, add to the training split only."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.config import GanConfig
from shared.data.cache import CachedImages
from shared.data.records import SPLITS
from shared.errors import DataError
from shared.gan.features import classifier_features
from shared.gan.selection import SelectionResult, select_synthetic
from shared.gan.training import at_gan_resolution, discriminator_scores, generate, to_uint8_hwc

SYNTHETIC_PREFIX = "synthetic-"
SYNTHETIC_FILE_VERSION = 1


def synthesis_targets(class_counts: np.ndarray, config: GanConfig) -> np.ndarray:
    """Synthetic images wanted per class: up to the target count, capped; none for classes the site lacks.

    Target: the site's median class count (`target='median'`) or `target_ratio` x its largest
    class (`target='ratio'`). A class the site has no training image of gets none: the memorisation
    guard and the site's own evaluation need real examples of it.
    """
    counts = np.asarray(class_counts, dtype=np.int64)
    target = np.median(counts) if config.target == "median" else config.target_ratio * counts.max()
    wanted = np.clip(np.floor(target).astype(np.int64) - counts, 0, config.max_synthetic_per_class)
    wanted[counts == 0] = 0
    return wanted


@dataclass
class SiteSynthesis:
    """A site's selected synthetic images and what the selection did."""

    images: CachedImages
    wanted: np.ndarray
    selection: SelectionResult | None

    def report(self) -> dict:
        """Counts per class and rejections per reason, as plain JSON values."""
        classes = self.images.classes
        added = self.images.class_counts()
        report = {
            "wanted": {name: int(self.wanted[i]) for i, name in enumerate(classes)},
            "added": {name: int(added[i]) for i, name in enumerate(classes)},
        }
        if self.selection is not None:
            report["candidates"] = int(self.selection.candidates)
            report["rejected"] = dict(self.selection.rejected)
            report["rejected_per_class"] = {
                reason: {classes[label]: count for label, count in per.items()} for reason, per in self.selection.rejected_per_class.items()
            }
            report["thresholds"] = {
                "memorisation": self.selection.thresholds.memorisation,
                "duplicate": self.selection.thresholds.duplicate,
                "real_nn_percentiles": self.selection.thresholds.real_nn_percentiles,
            }
        return report


def synthesise_for_site(
    generator: nn.Module,
    discriminator: nn.Module,
    feature_model: nn.Module,
    train_images: CachedImages,
    *,
    config: GanConfig,
    image_size: int,
    seed: int,
) -> SiteSynthesis:
    """Generate candidates for the site's under-target classes, select them, and return the kept images.

    Candidates are `candidates_per_image` x the wanted count per class; selection uses the
    discriminator's scores and `feature_model`'s penultimate features (see `select_synthetic`);
    within a class the most realistic survivors are kept, at most the wanted count. The returned
    images are resized to the classifier's `image_size` and all marked as training images.
    """
    classes = train_images.classes
    wanted = synthesis_targets(train_images.class_counts(), config)
    empty = _synthetic_set(np.zeros((0, image_size, image_size, 3), np.uint8), np.zeros(0, np.int64), classes)
    if wanted.sum() == 0:
        return SiteSynthesis(empty, wanted, None)
    candidates_wanted = np.ceil(wanted * config.candidates_per_image).astype(np.int64)
    labels = np.repeat(np.arange(len(classes)), candidates_wanted)
    fakes = generate(generator, labels, seed=seed)
    scores = discriminator_scores(discriminator, fakes, labels)
    fake_pixels = to_uint8_hwc(fakes)
    with torch.no_grad():
        fake_features = classifier_features(feature_model, fake_pixels, image_size=image_size)
        # Real images pass through the GAN's resolution too, so a copy is as close as a copy can be.
        real_pixels = at_gan_resolution(np.asarray(train_images.images), generator.image_size)
        real_features = classifier_features(feature_model, real_pixels, image_size=image_size)
    selection = select_synthetic(
        labels, scores, fake_features, real_features,
        realism_reject_fraction=config.realism_reject_fraction,
        memorisation_percentile=config.memorisation_percentile,
        duplicate_percentile=config.duplicate_percentile,
    )
    kept = [row for label in range(len(classes)) for row in selection.kept[labels[selection.kept] == label][: wanted[label]]]
    kept = np.asarray(kept, dtype=np.int64)
    pixels = fakes[kept] if len(kept) else fakes[:0]
    if pixels.shape[-1] != image_size:
        pixels = nn.functional.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return SiteSynthesis(_synthetic_set(to_uint8_hwc(pixels), labels[kept], classes), wanted, selection)


def _synthetic_set(pixels: np.ndarray, labels: np.ndarray, classes: list[str]) -> CachedImages:
    return CachedImages(
        images=pixels,
        labels=np.asarray(labels, dtype=np.int64),
        image_ids=[f"{SYNTHETIC_PREFIX}{classes[label]}-{index:05d}" for index, label in enumerate(labels)],
        splits=np.asarray(["train"] * len(labels)),
        classes=list(classes),
        source="synthetic",
    )


def add_synthetic_to_training(site_images: CachedImages, synthetic: CachedImages) -> CachedImages:
    """The site's images with the synthetic ones appended to its training split; val and test unchanged.

    Rows stay grouped by split (train, synthetic, val, test), so every split is still one slice.
    """
    if synthetic.classes != site_images.classes:
        raise DataError(
            f"synthetic images have classes {synthetic.classes}, the site {site_images.classes}; "
            "synthesise again with the run's class list"
        )
    if len(synthetic) and set(np.asarray(synthetic.splits).tolist()) != {"train"}:
        raise DataError("synthetic images may only join the training split; they are marked for another split")
    is_train = np.asarray(site_images.splits) == "train"
    before = np.flatnonzero(is_train)
    after = np.flatnonzero(~is_train)
    if len(before) and len(after) and before.max() > after.min():
        raise DataError(f"{site_images.source}: rows are not grouped by split; rebuild the site's image cache")
    if len(synthetic) and synthetic.images.shape[1:] != site_images.images.shape[1:]:
        raise DataError(
            f"synthetic images are {synthetic.images.shape[1:]}, the site's {site_images.images.shape[1:]}; "
            "synthesise at the classifier's image size"
        )
    cut = len(before)
    order = np.concatenate([np.arange(cut), np.arange(len(synthetic)) + len(site_images), np.arange(cut, len(site_images))])
    images = np.concatenate([np.asarray(site_images.images), synthetic.images])[order]
    ids = list(site_images.image_ids) + list(synthetic.image_ids)
    combined = CachedImages(
        images=images,
        labels=np.concatenate([site_images.labels, synthetic.labels]).astype(np.int64)[order],
        image_ids=[ids[row] for row in order],
        splits=np.concatenate([np.asarray(site_images.splits), np.asarray(synthetic.splits)])[order],
        classes=list(site_images.classes),
        skipped=list(site_images.skipped),
        source=f"{site_images.source} + {len(synthetic)} synthetic",
    )
    require_real_evaluation_splits(combined)
    return combined


def require_real_evaluation_splits(images: CachedImages) -> None:
    """Raise when any synthetic image sits in a validation or test split."""
    for split in SPLITS:
        if split == "train":
            continue
        ids = np.asarray(images.image_ids, dtype=object)[np.asarray(images.splits) == split]
        leaked = [image_id for image_id in ids if str(image_id).startswith(SYNTHETIC_PREFIX)]
        if leaked:
            raise DataError(f"{len(leaked)} synthetic image(s) are in the {split} split (e.g. {leaked[0]}); they may only be training images")


def save_synthetic(path: Path, synthesis: SiteSynthesis) -> Path:
    """Write a site's synthetic set (pixels, labels, classes, selection report) to one .npz file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(
        temporary,
        images=synthesis.images.images,
        labels=synthesis.images.labels,
        classes=np.asarray(synthesis.images.classes),
        report=np.asarray(json.dumps(synthesis.report())),
        version=np.asarray(SYNTHETIC_FILE_VERSION),
    )
    temporary.replace(path)
    return path


def load_synthetic(path: Path, classes: list[str]) -> CachedImages:
    """A synthetic set written by `save_synthetic`, checked against the run's classes."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"synthetic images {path} do not exist; run the GAN synthesis step first (gan augment with rounds or a generator)")
    with np.load(path) as data:
        saved_classes = [str(name) for name in data["classes"]]
        if saved_classes != list(classes):
            raise DataError(f"{path} was synthesised for classes {saved_classes}, not {classes}; synthesise again")
        return _synthetic_set(data["images"], data["labels"], saved_classes)
