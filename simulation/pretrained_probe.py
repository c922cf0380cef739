"""Linear probe showing that the packaged ImageNet weights of the default model load correctly.

Frozen pooled features of HAM10000 images from (a) tf_efficientnet_lite0 with the packaged
ImageNet weights and (b) the same network randomly initialised are each fed to a class-balanced
logistic regression; correctly loaded weights give clearly better test figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.model_selection import StratifiedGroupKFold, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from shared.config import DEFAULT_MODEL, ModelConfig
from shared.errors import DataError, SkinFLError
from shared.models.classifier import build_classifier, model_normalisation

DEFAULT_DATA = Path("../shared/data/ham10000")
METADATA_FILE = "HAM10000_metadata.csv"
REQUIRED_COLUMNS = ("lesion_id", "image_id", "dx")
PROBE_INVERSE_REGULARISATION = 0.1
"""Logistic-regression C: stronger than scikit-learn's 1.0, as 1280 features meet 1500 images."""


def read_metadata(folder: Path) -> pd.DataFrame:
    """HAM10000 rows (lesion_id, image_id, dx, path) whose image file exists; reports the rows without one."""
    csv_path = folder / METADATA_FILE
    if not csv_path.is_file():
        raise DataError(f"{csv_path} does not exist; pass --data a HAM10000 folder holding {METADATA_FILE} and images/")
    frame = pd.read_csv(csv_path, dtype=str)
    missing_columns = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
    if missing_columns:
        raise DataError(f"{csv_path} lacks the columns {missing_columns}; give the Dataverse HAM10000 metadata file")
    frame["path"] = [str(folder / "images" / f"{image_id}.jpg") for image_id in frame["image_id"]]
    has_image = frame["path"].map(lambda path: Path(path).is_file())
    if not has_image.any():
        raise DataError(f"none of the {len(frame)} images listed in {csv_path} is in {folder / 'images'}")
    if not has_image.all():
        print(f"{int((~has_image).sum())} of {len(frame)} metadata rows have no image file in {folder / 'images'}; left out")
    return frame[has_image].reset_index(drop=True)


def lesion_disjoint_sample(frame: pd.DataFrame, train_size: int, test_size: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Class-stratified train and test samples with no lesion in both."""
    folds = StratifiedGroupKFold(n_splits=4, shuffle=True, random_state=seed)
    train_rows, test_rows = next(folds.split(frame, frame["dx"], groups=frame["lesion_id"]))
    pools = frame.iloc[train_rows], frame.iloc[test_rows]
    samples = []
    for pool, size in zip(pools, (train_size, test_size)):
        if size >= len(pool):
            samples.append(pool)
        else:
            sample, _ = train_test_split(pool, train_size=size, stratify=pool["dx"], random_state=seed)
            samples.append(sample)
    return samples[0].reset_index(drop=True), samples[1].reset_index(drop=True)


def load_images(paths: list[str], image_size: int, mean, std) -> torch.Tensor:
    """Images resized (shorter side) and centre-cropped to `image_size`, normalised, as an NCHW tensor."""
    batch = np.empty((len(paths), image_size, image_size, 3), dtype=np.float32)
    for index, path in enumerate(paths):
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = image_size / min(image.size)
            width, height = max(image_size, round(image.width * scale)), max(image_size, round(image.height * scale))
            image = image.resize((width, height), Image.BICUBIC)
            left, top = (width - image_size) // 2, (height - image_size) // 2
            batch[index] = np.asarray(image.crop((left, top, left + image_size, top + image_size)), dtype=np.float32) / 255
    batch = (batch - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()


def pooled_features(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> np.ndarray:
    """Frozen pre-logits features (global-pooled) of every image."""
    model.eval()
    features = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            feature_maps = model.forward_features(images[start : start + batch_size])
            features.append(model.forward_head(feature_maps, pre_logits=True).float().numpy())
    return np.concatenate(features)


def probe(model: torch.nn.Module, train: pd.DataFrame, test: pd.DataFrame, classes: list[str], args) -> dict:
    """Balanced accuracy and accuracy of a logistic regression on the model's frozen features."""
    mean, std = model_normalisation(model)
    train_features = pooled_features(model, load_images(list(train["path"]), args.image_size, mean, std), args.batch_size)
    test_features = pooled_features(model, load_images(list(test["path"]), args.image_size, mean, std), args.batch_size)
    classifier = make_pipeline(
        StandardScaler(),
        LogisticRegression(
            C=PROBE_INVERSE_REGULARISATION, class_weight="balanced", max_iter=3000, random_state=args.seed
        ),
    )
    train_labels = train["dx"].map(classes.index).to_numpy()
    test_labels = test["dx"].map(classes.index).to_numpy()
    classifier.fit(train_features, train_labels)
    predictions = classifier.predict(test_features)
    return {
        "balanced_accuracy": balanced_accuracy_score(test_labels, predictions),
        "accuracy": accuracy_score(test_labels, predictions),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the probe on both initialisations and print their test figures."""
    parser = argparse.ArgumentParser(prog="python -m simulation.pretrained_probe", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"HAM10000 folder (default {DEFAULT_DATA})")
    parser.add_argument("--train-images", type=int, default=1500, help="training sample size (default 1500)")
    parser.add_argument("--test-images", type=int, default=500, help="test sample size (default 500)")
    parser.add_argument("--image-size", type=int, default=128, help="square input side in pixels (default 128)")
    parser.add_argument("--batch-size", type=int, default=64, help="feature-extraction batch size (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample and the random initialisation")
    args = parser.parse_args(argv)
    try:
        frame = read_metadata(args.data)
        train, test = lesion_disjoint_sample(frame, args.train_images, args.test_images, args.seed)
        classes = sorted(frame["dx"].unique())
        print(f"{len(train)} training and {len(test)} test images ({len(classes)} classes), lesion-disjoint, {args.image_size} px")
        results = {}
        for name, pretrained in (("pretrained", "default"), ("random", "none")):
            torch.manual_seed(args.seed)
            started = time.monotonic()
            model = build_classifier(ModelConfig(name=DEFAULT_MODEL, pretrained=pretrained), num_classes=len(classes))
            results[name] = probe(model, train, test, classes, args)
            print(f"{name} features done in {time.monotonic() - started:.0f} s")
    except SkinFLError as error:
        print(f"pretrained_probe: error: {error}", file=sys.stderr)
        return 2
    print(f"\n{'initialisation':<16}{'balanced acc.':>14}{'accuracy':>10}")
    for name, figures in results.items():
        print(f"{name:<16}{figures['balanced_accuracy']:>14.3f}{figures['accuracy']:>10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
