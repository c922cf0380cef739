"""Reader of the ISIC 2020 (SIIM-ISIC melanoma) training set: benign or malignant, grouped by patient.

Expected files under the dataset folder:

- `train.csv` with at least `image_name`, `patient_id` and `target` (0 = benign, 1 = malignant);
  the full release adds sex, age_approx, anatom_site_general_challenge, diagnosis and
  benign_malignant. All images of a patient form one `group`; the data names no site ("").
- The images `<image_name>.jpg` in `train/`, `jpeg/train/` (the Kaggle layout), `images/` or
  the folder itself.
"""

from __future__ import annotations

from pathlib import Path

from shared.data._reader_support import UnknownLabel, read_csv_file, read_labelled_csv_table, require_folder
from shared.data.records import ImageTable

ISIC2020_CLASSES = ["benign", "malignant"]
LABELS_FILE = "train.csv"
IMAGE_FOLDERS = ("train", "jpeg/train", "images", "")
EXPECTED_LAYOUT = f"{LABELS_FILE} and the images in train/ (or jpeg/train/)"


def _target_label(values: dict[str, str]) -> str:
    text = values["target"]
    try:
        number = float(text)
    except ValueError:
        number = None
    if number not in (0.0, 1.0):
        raise UnknownLabel(f"target={text!r}; allowed: 0 (benign), 1 (malignant)")
    return ISIC2020_CLASSES[int(number)]


def read_isic2020(root: Path, *, skip_bad: bool = False) -> ImageTable:
    """Read an ISIC 2020 folder: benign/malignant labels and patient groups of existing images."""
    root = require_folder(root, "ISIC 2020", EXPECTED_LAYOUT)
    labels = read_csv_file(
        root / LABELS_FILE, ("image_name", "patient_id", "target"), what="ISIC 2020 training labels file"
    )
    return read_labelled_csv_table(
        root,
        labels,
        id_column="image_name",
        label_of=_target_label,
        image_folders=IMAGE_FOLDERS,
        group_and_site_of=lambda row: (row.values["patient_id"], ""),
        classes=ISIC2020_CLASSES,
        format_name="isic2020",
        skip_bad=skip_bad,
    )
