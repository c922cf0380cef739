"""Reader of the HAM10000 dataset (Tschandl et al. 2018) in its Dataverse and Kaggle layouts.

Expected files under the dataset folder:

- `HAM10000_metadata.csv` with at least the columns `lesion_id`, `image_id` and `dx`
  (one of akiec, bcc, bkl, df, mel, nv, vasc). The Dataverse release adds `dx_type`, `age`,
  `sex`, `localization` and `dataset`; `dataset` names the source site (vidir_modern,
  vidir_molemax, vienna_dias, rosendahl) and becomes the table's `site`; without it `site` is "".
- The images `<image_id>.jpg`, in `images/`, directly in the folder, or split over
  `HAM10000_images_part_1/` and `HAM10000_images_part_2/` as in the two-part download
  (lower-case `ham10000_images_part_*` folders, as in the Kaggle copy, work too).

Several images of one lesion share a `lesion_id`, which becomes the table's `group`.
"""

from __future__ import annotations

from pathlib import Path

from shared.data._reader_support import UnknownLabel, read_csv_file, read_labelled_csv_table, require_folder
from shared.data.records import ImageTable

HAM10000_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
METADATA_FILE = "HAM10000_metadata.csv"
IMAGE_FOLDERS = (
    "images",
    "",
    "HAM10000_images_part_1",
    "HAM10000_images_part_2",
    "ham10000_images_part_1",
    "ham10000_images_part_2",
)
EXPECTED_LAYOUT = f"{METADATA_FILE} and the images in images/ (or HAM10000_images_part_1/ and _part_2/)"


def _ham10000_label(values: dict[str, str]) -> str:
    label = values["dx"].lower()
    if label not in HAM10000_CLASSES:
        raise UnknownLabel(f"dx={values['dx']!r}; allowed: {', '.join(HAM10000_CLASSES)}")
    return label


def read_ham10000(root: Path, *, skip_bad: bool = False) -> ImageTable:
    """Read a HAM10000 folder: labels, lesion groups and source sites of images that exist."""
    root = require_folder(root, "HAM10000", EXPECTED_LAYOUT)
    metadata = read_csv_file(
        root / METADATA_FILE, ("lesion_id", "image_id", "dx"), what="HAM10000 metadata file of the Dataverse or Kaggle download"
    )
    return read_labelled_csv_table(
        root,
        metadata,
        id_column="image_id",
        label_of=_ham10000_label,
        image_folders=IMAGE_FOLDERS,
        group_and_site_of=lambda row: (row.values["lesion_id"], row.values.get("dataset", "")),
        classes=HAM10000_CLASSES,
        format_name="ham10000",
        skip_bad=skip_bad,
    )
