"""Reader of the ISIC 2019 training set (BCN20000, HAM10000 and MSK images; eight classes).

Expected files under the dataset folder:

- `ISIC_2019_Training_GroundTruth.csv`: `image` and the one-hot columns MEL, NV, BCC, AK, BKL,
  DF, VASC, SCC (and UNK) holding 0.0/1.0; exactly one class column is 1.0 per row.
- Optionally `ISIC_2019_Training_Metadata.csv`: `image`, `age_approx`, `anatom_site_general`,
  `lesion_id`, `sex`. Its `lesion_id` becomes the table's `group` (the image id where it is empty);
  the source site is its `site`, `dataset` or `center` column when present, otherwise the prefix
  of `lesion_id` before `_` (BCN, HAM, MSK4, ... name the source archive), otherwise "".
- The images `<image>.jpg` in `ISIC_2019_Training_Input/`, `images/` or the folder itself.
"""

from __future__ import annotations

from pathlib import Path

from shared.data._reader_support import UnknownLabel, read_csv_file, read_labelled_csv_table, require_folder
from shared.data.records import ImageTable
from shared.errors import DataError

ISIC2019_CLASS_MAP = {
    "MEL": "mel",
    "NV": "nv",
    "BCC": "bcc",
    "AK": "akiec",
    "BKL": "bkl",
    "DF": "df",
    "VASC": "vasc",
    "SCC": "scc",
}
ISIC2019_CLASSES = list(ISIC2019_CLASS_MAP.values())
GROUND_TRUTH_FILE = "ISIC_2019_Training_GroundTruth.csv"
METADATA_FILE = "ISIC_2019_Training_Metadata.csv"
IMAGE_FOLDERS = ("ISIC_2019_Training_Input", "images", "")
SITE_COLUMNS = ("site", "dataset", "center")
EXPECTED_LAYOUT = f"{GROUND_TRUTH_FILE} (optionally {METADATA_FILE}) and the images in ISIC_2019_Training_Input/"


def _one_hot_label(values: dict[str, str]) -> str:
    positives = []
    for column in [*ISIC2019_CLASS_MAP, "UNK"]:
        text = values.get(column)
        if text is None:
            continue
        try:
            number = float(text)
        except ValueError:
            number = None
        if number not in (0.0, 1.0):
            raise UnknownLabel(f"{column}={text!r}; every class column must be 0.0 or 1.0")
        if number == 1.0:
            positives.append(column)
    allowed = ", ".join(ISIC2019_CLASS_MAP)
    if positives == ["UNK"]:
        raise UnknownLabel(f"UNK (the row is marked unknown); allowed: exactly one of {allowed} set to 1.0")
    if len(positives) != 1:
        raise UnknownLabel(f"{positives or 'none'} set to 1.0; allowed: exactly one of {allowed} set to 1.0")
    return ISIC2019_CLASS_MAP[positives[0]]


def _read_metadata(root: Path) -> tuple[dict[str, dict[str, str]], str | None]:
    """Metadata rows by image id and the name of its site column (if any); empty without the file."""
    path = root / METADATA_FILE
    if not path.is_file():
        return {}, None
    metadata = read_csv_file(path, ("image",), what="ISIC 2019 training metadata file")
    by_image: dict[str, dict[str, str]] = {}
    first_line: dict[str, int] = {}
    for row in metadata.rows:
        image_id = row.values["image"]
        if image_id in by_image:
            raise DataError(
                f"duplicate image id {image_id!r} in {path}: lines {first_line[image_id]} and {row.line}; "
                "keep one metadata row per image"
            )
        by_image[image_id] = row.values
        first_line[image_id] = row.line
    site_column = next((column for column in SITE_COLUMNS if column in metadata.columns), None)
    return by_image, site_column


def _site(values: dict[str, str], site_column: str | None) -> str:
    if site_column is not None:
        return values.get(site_column, "")
    lesion_id = values.get("lesion_id", "")
    return lesion_id.split("_", 1)[0] if "_" in lesion_id else ""


def read_isic2019(root: Path, *, skip_bad: bool = False) -> ImageTable:
    """Read an ISIC 2019 folder: one-hot labels, lesion groups and source archives of existing images."""
    root = require_folder(root, "ISIC 2019", EXPECTED_LAYOUT)
    ground_truth = read_csv_file(
        root / GROUND_TRUTH_FILE, ("image", *ISIC2019_CLASS_MAP), what="ISIC 2019 training ground truth (one-hot) file"
    )
    metadata, site_column = _read_metadata(root)

    def group_and_site_of(row) -> tuple[str, str]:
        extra = metadata.get(row.image_id, {})
        return extra.get("lesion_id", ""), _site(extra, site_column)

    return read_labelled_csv_table(
        root,
        ground_truth,
        id_column="image",
        label_of=_one_hot_label,
        image_folders=IMAGE_FOLDERS,
        group_and_site_of=group_and_site_of,
        classes=ISIC2019_CLASSES,
        format_name="isic2019",
        skip_bad=skip_bad,
    )
