"""Dataset readers on generated datasets in the real formats, and every bad-input case."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image

from shared.data.demo import write_demo_dataset
from shared.data.ham10000 import HAM10000_CLASSES, read_ham10000
from shared.data.image_folder import read_image_folder
from shared.data.isic2019 import ISIC2019_CLASS_MAP, read_isic2019
from shared.data.isic2020 import read_isic2020
from shared.data.readers import READERS, detect_format, read_dataset
from shared.errors import ConfigError, DataError

SMALL = {"num_images": 60, "width": 48, "height": 36}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    """One small generated dataset per format (and both HAM10000 layouts)."""
    base = tmp_path_factory.mktemp("demo")
    formats = ("ham10000", "isic2019", "isic2020", "folder")
    roots = {name: write_demo_dataset(base / name, format=name, **SMALL) for name in formats}
    roots["ham10000-parts"] = write_demo_dataset(base / "parts", format="ham10000", layout="parts", **SMALL)
    return roots


def write_csv(path: Path, columns: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def write_jpg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (180, 120, 90)).save(path)
    return path


def tiny_ham(root: Path, rows: list[list[str]], images: list[str] | None = None) -> Path:
    """A HAM10000 folder with the given (lesion_id, image_id, dx) rows and images for `images` (default: all)."""
    root.mkdir(parents=True)
    write_csv(root / "HAM10000_metadata.csv", ["lesion_id", "image_id", "dx"], rows)
    for image_id in images if images is not None else [row[1] for row in rows]:
        write_jpg(root / "images" / f"{image_id}.jpg")
    return root


def check_table(table, classes: list[str]) -> None:
    assert table.classes == classes
    assert list(table.frame.columns) == ["image_id", "path", "label", "group", "site"]
    assert len(table) == SMALL["num_images"]
    assert table.frame["image_id"].is_unique
    assert all(Path(path).is_absolute() and Path(path).is_file() for path in table.frame["path"])
    assert set(table.frame["label"]) <= set(classes)
    assert table.skipped == []


@pytest.mark.parametrize("layout", ["ham10000", "ham10000-parts"])
def test_ham10000_reads_both_layouts_with_lesions_and_sites(demo, layout):
    table = read_ham10000(demo[layout])
    check_table(table, HAM10000_CLASSES)
    assert table.format == "ham10000"
    assert sorted(table.frame["site"].unique()) == ["demo_clinic_1", "demo_clinic_2", "demo_clinic_3"]
    assert table.frame["group"].nunique() < len(table), "some lesions have two images"
    assert all(count >= 8 for count in table.class_counts().values())
    if layout == "ham10000-parts":
        folders = {Path(path).parent.name for path in table.frame["path"]}
        assert folders == {"HAM10000_images_part_1", "HAM10000_images_part_2"}


def test_ham10000_without_dataset_column_has_no_site(tmp_path):
    root = tiny_ham(tmp_path / "ham", [["HAM_1", "ISIC_1", "nv"], ["HAM_1", "ISIC_2", "nv"], ["", "ISIC_3", "MEL"]])
    table = read_ham10000(root)
    assert list(table.frame["site"]) == ["", "", ""]
    assert list(table.frame["group"]) == ["HAM_1", "HAM_1", "ISIC_3"]
    assert list(table.frame["label"]) == ["nv", "nv", "mel"]


def test_isic2019_reads_one_hot_labels_lesions_and_archive_prefix_sites(demo):
    table = read_isic2019(demo["isic2019"])
    check_table(table, list(ISIC2019_CLASS_MAP.values()))
    assert table.classes == ["mel", "nv", "bcc", "akiec", "bkl", "df", "vasc", "scc"]
    assert sorted(table.frame["site"].unique()) == ["DEMO1", "DEMO2", "DEMO3"]
    assert all(group.startswith("DEMO") for group in table.frame["group"])
    assert table.class_counts()["scc"] == 0


def one_hot_row(image: str, positive: str | None, unknown: bool = False) -> list[str]:
    return [image, *("1.0" if name == positive else "0.0" for name in ISIC2019_CLASS_MAP), "1.0" if unknown else "0.0"]


def tiny_isic2019(root: Path, truth: list[list[str]], metadata: tuple[list[str], list[list[str]]] | None = None) -> Path:
    root.mkdir(parents=True)
    write_csv(root / "ISIC_2019_Training_GroundTruth.csv", ["image", *ISIC2019_CLASS_MAP, "UNK"], truth)
    if metadata is not None:
        write_csv(root / "ISIC_2019_Training_Metadata.csv", *metadata)
    for row in truth:
        write_jpg(root / "ISIC_2019_Training_Input" / f"{row[0]}.jpg")
    return root


def test_isic2019_site_column_wins_and_empty_lesion_falls_back_to_image(tmp_path):
    metadata = (["image", "lesion_id", "center"], [["ISIC_1", "BCN_0000001", "barcelona"], ["ISIC_2", "", "vienna"]])
    root = tiny_isic2019(tmp_path / "isic", [one_hot_row("ISIC_1", "AK"), one_hot_row("ISIC_2", "SCC")], metadata)
    table = read_isic2019(root)
    assert list(table.frame["label"]) == ["akiec", "scc"]
    assert list(table.frame["site"]) == ["barcelona", "vienna"]
    assert list(table.frame["group"]) == ["BCN_0000001", "ISIC_2"]


def test_isic2019_without_metadata_has_image_groups_and_no_sites(tmp_path):
    table = read_isic2019(tiny_isic2019(tmp_path / "isic", [one_hot_row("ISIC_1", "MEL")]))
    assert list(table.frame["group"]) == ["ISIC_1"] and list(table.frame["site"]) == [""]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (one_hot_row("ISIC_2", None, unknown=True), r"line 3: unknown label UNK"),
        (one_hot_row("ISIC_2", None), r"line 3: unknown label none set to 1.0; allowed: exactly one of MEL, NV"),
        (["ISIC_2", "1.0", "1.0", *["0.0"] * 7], r"line 3: unknown label \['MEL', 'NV'\] set to 1.0"),
        (["ISIC_2", "yes", *["0.0"] * 8], r"line 3: unknown label MEL='yes'"),
    ],
)
def test_isic2019_rows_without_exactly_one_class_are_unknown_labels(tmp_path, row, message):
    root = tiny_isic2019(tmp_path / "isic", [one_hot_row("ISIC_1", "NV"), row])
    with pytest.raises(DataError, match=message):
        read_isic2019(root)


def test_isic2020_reads_targets_and_patient_groups(demo):
    table = read_isic2020(demo["isic2020"])
    check_table(table, ["benign", "malignant"])
    assert table.class_counts()["malignant"] >= 8
    assert all(group.startswith("IP_") for group in table.frame["group"])
    assert set(table.frame["site"]) == {""}


def test_isic2020_finds_kaggle_jpeg_train_folder_and_rejects_other_targets(tmp_path):
    root = tmp_path / "isic2020"
    root.mkdir()
    write_csv(root / "train.csv", ["image_name", "patient_id", "target"], [["ISIC_1", "IP_1", "0"], ["ISIC_2", "IP_1", "1"]])
    for name in ("ISIC_1", "ISIC_2"):
        write_jpg(root / "jpeg" / "train" / f"{name}.jpg")
    assert list(read_isic2020(root).frame["label"]) == ["benign", "malignant"]
    write_csv(root / "train.csv", ["image_name", "patient_id", "target"], [["ISIC_1", "IP_1", "2"]])
    with pytest.raises(DataError, match=r"train.csv line 2: unknown label target='2'; allowed: 0 \(benign\), 1 \(malignant\)"):
        read_isic2020(root)


def test_image_folder_reads_classes_and_groups_csv(demo):
    table = read_image_folder(demo["folder"])
    check_table(table, HAM10000_CLASSES)
    assert all(image_id.split("/")[0] == label for image_id, label in zip(table.frame["image_id"], table.frame["label"]))
    assert table.frame["group"].nunique() < len(table), "groups.csv keeps two-image lesions together"


def test_image_folder_without_groups_ignores_system_files_and_accepts_any_case_extension(tmp_path):
    root = tmp_path / "export"
    write_jpg(root / "benign" / "a.JPG")
    Image.new("RGB", (8, 8)).save(root / "benign" / "b.PNG")
    write_jpg(root / "malignant" / "c.jpeg")
    (root / "benign" / "Thumbs.db").write_bytes(b"x")
    (root / "malignant" / ".DS_Store").write_bytes(b"x")
    (root / ".hidden").mkdir()
    table = read_image_folder(root)
    assert table.classes == ["benign", "malignant"]
    assert list(table.frame["image_id"]) == ["benign/a", "benign/b", "malignant/c"]
    assert list(table.frame["group"]) == list(table.frame["image_id"])


def test_image_folder_empty_class_is_an_error(tmp_path):
    write_jpg(tmp_path / "export" / "nv" / "a.jpg")
    (tmp_path / "export" / "df").mkdir()
    with pytest.raises(DataError, match=r"empty class 'df'.*add the class's images or remove the folder"):
        read_image_folder(tmp_path / "export")


def test_image_folder_non_image_file_is_an_error_or_skipped(tmp_path):
    root = tmp_path / "export"
    write_jpg(root / "nv" / "a.jpg")
    (root / "nv" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"notes.txt: not a .jpg/.jpeg/.png image; remove it.*--skip-bad"):
        read_image_folder(root)
    table = read_image_folder(root, skip_bad=True)
    assert list(table.frame["image_id"]) == ["nv/a"]
    assert [Path(row.source).name for row in table.skipped] == ["notes.txt"]


def test_image_folder_groups_csv_naming_no_image_is_a_bad_row(tmp_path):
    root = tmp_path / "export"
    write_jpg(root / "nv" / "a.jpg")
    write_csv(root / "groups.csv", ["image", "group"], [["nv/a.jpg", "L1"], ["nv/gone.jpg", "L2"]])
    with pytest.raises(DataError, match=r"groups.csv line 3: missing image 'nv/gone.jpg'"):
        read_image_folder(root)
    table = read_image_folder(root, skip_bad=True)
    assert list(table.frame["group"]) == ["L1"] and len(table.skipped) == 1


def test_missing_folder_names_it(tmp_path):
    for reader in READERS.values():
        with pytest.raises(DataError, match=r"nowhere does not exist or is not a folder; give the folder"):
            reader(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("format_name", "expected_file"),
    [("ham10000", "HAM10000_metadata.csv"), ("isic2019", "ISIC_2019_Training_GroundTruth.csv"), ("isic2020", "train.csv")],
)
def test_missing_csv_says_which_file_is_expected_where(tmp_path, format_name, expected_file):
    with pytest.raises(DataError, match=rf"{expected_file} not found in {tmp_path}; expected {tmp_path / expected_file}"):
        read_dataset(tmp_path, format_name)


def test_missing_column_is_named(tmp_path):
    (tmp_path / "HAM10000_metadata.csv").write_text("lesion_id,image_id,diagnosis\nHAM_1,ISIC_1,nv\n")
    header = r"\(its header has \['lesion_id', 'image_id', 'diagnosis'\]\)"
    with pytest.raises(DataError, match=r"lacks column\(s\) \['dx'\] " + header):
        read_ham10000(tmp_path)


def test_unknown_label_names_line_value_and_allowed_labels(tmp_path):
    root = tiny_ham(tmp_path / "ham", [["HAM_1", "ISIC_1", "nv"], ["HAM_2", "ISIC_2", "melanoma"]])
    with pytest.raises(DataError, match=r"HAM10000_metadata.csv line 3: unknown label dx='melanoma'; allowed: akiec, bcc, bkl"):
        read_ham10000(root)


def test_missing_image_names_it_and_the_folders_searched(tmp_path):
    root = tiny_ham(tmp_path / "ham", [["HAM_1", "ISIC_1", "nv"], ["HAM_2", "ISIC_2", "nv"]], images=["ISIC_1"])
    searched = r"not in any of images/, ./, HAM10000_images_part_1/, .* under "
    with pytest.raises(DataError, match=r"line 3: missing image ISIC_2.jpg: " + searched):
        read_ham10000(root)


def test_several_bad_rows_are_counted_in_one_error(tmp_path):
    rows = [["HAM_1", "ISIC_1", "xx"], ["HAM_2", "ISIC_2", "nv"], ["HAM_3", "ISIC_3", "nv"]]
    root = tiny_ham(tmp_path / "ham", rows, images=["ISIC_1"])
    with pytest.raises(DataError, match=r"line 2: unknown label dx='xx'.* \(2 more bad rows or files after it\)"):
        read_ham10000(root)


def test_duplicate_image_id_names_both_lines(tmp_path):
    root = tiny_ham(tmp_path / "ham", [["HAM_1", "ISIC_1", "nv"], ["HAM_1", "ISIC_1", "nv"]])
    with pytest.raises(DataError, match=r"duplicate image id 'ISIC_1': .*line 2 and .*line 3; keep one row"):
        read_ham10000(root)
    with pytest.raises(DataError, match="duplicate image id"):
        read_ham10000(root, skip_bad=True)


def test_image_ids_differing_only_in_case_are_duplicates_naming_both(tmp_path):
    root = tiny_ham(tmp_path / "ham", [["HAM_1", "ISIC_0024569", "nv"], ["HAM_2", "isic_0024569", "mel"]], images=["ISIC_0024569"])
    expected = r"image ids 'ISIC_0024569' \(.*line 2\) and 'isic_0024569' \(.*line 3\) differ only in case.*remove or rename one"
    with pytest.raises(DataError, match=expected):
        read_ham10000(root)
    with pytest.raises(DataError, match="differ only in case"):
        read_ham10000(root, skip_bad=True)


def test_empty_dataset_is_an_error(tmp_path):
    root = tiny_ham(tmp_path / "ham", [])
    with pytest.raises(DataError, match=r"empty dataset: no usable images in"):
        read_ham10000(root)


def test_skip_bad_leaves_bad_rows_out_and_lists_them(tmp_path):
    rows = [["HAM_1", "ISIC_1", "nv"], ["HAM_2", "ISIC_2", "unknown"], ["HAM_3", "ISIC_3", "mel"]]
    root = tiny_ham(tmp_path / "ham", rows, images=["ISIC_1", "ISIC_2"])
    table = read_ham10000(root, skip_bad=True)
    assert list(table.frame["image_id"]) == ["ISIC_1"]
    assert [row.source.rsplit(" ", 1)[1] for row in table.skipped] == ["3", "4"]
    assert table.skipped[0].reason.startswith("unknown label dx='unknown'")
    assert table.skipped[1].reason.startswith("missing image ISIC_3.jpg")


def test_skip_bad_still_fails_when_nothing_is_left(tmp_path):
    root = tiny_ham(tmp_path / "ham", [["HAM_1", "ISIC_1", "xx"]])
    with pytest.raises(DataError, match=r"empty dataset: .*\(1 bad rows or files were skipped\)"):
        read_ham10000(root, skip_bad=True)


def test_detect_format_recognises_every_format(demo):
    assert detect_format(demo["ham10000"]) == "ham10000"
    assert detect_format(demo["ham10000-parts"]) == "ham10000"
    assert detect_format(demo["isic2019"]) == "isic2019"
    assert detect_format(demo["isic2020"]) == "isic2020"
    assert detect_format(demo["folder"]) == "folder"


def test_detect_format_lists_what_each_format_expects(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    layouts = r"ham10000: HAM10000_metadata.csv.*isic2019: .*isic2020: .*folder: one sub-folder per class"
    with pytest.raises(DataError, match=r"cannot tell the format .*" + layouts):
        detect_format(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        detect_format(tmp_path / "nowhere")


def test_read_dataset_dispatches_and_rejects_unknown_formats(demo):
    assert len(read_dataset(demo["folder"], "folder")) == SMALL["num_images"]
    with pytest.raises(ConfigError, match=r"unknown data format 'ham'; use one of ham10000, isic2019, isic2020, folder"):
        read_dataset(demo["folder"], "ham")
    with pytest.raises(ConfigError, match=r"format 'demo' names no folder to read"):
        read_dataset(demo["folder"], "demo")
