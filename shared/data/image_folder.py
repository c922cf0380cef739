"""Reader of a hospital's own export: one sub-folder of images per class.

Expected layout under the dataset folder:

- `<class name>/<image>.jpg|.jpeg|.png` (extensions in any case); the classes are the sorted
  sub-folder names and every class folder must hold at least one image.
- Optionally `groups.csv` with the columns `image` (the file's path relative to the folder,
  like `mel/img_001.jpg`) and `group` (lesion or patient id), so splits keep a lesion's images
  together; an image it does not list (or lists with an empty group) is a group of its own.

Hidden files, `Thumbs.db` and `.DS_Store` are ignored; any other file that is not an image, and
any file outside a class folder, is an error (or is skipped and listed with skip_bad). The image
id is `<class>/<file stem>`; the data names no site ("").
"""

from __future__ import annotations

from pathlib import Path

from shared.data._reader_support import BadRows, TableEntry, build_table, read_csv_file, require_folder
from shared.data.records import ImageTable
from shared.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
GROUPS_FILE = "groups.csv"
EXPECTED_LAYOUT = "one sub-folder per class holding its .jpg/.jpeg/.png images (optionally groups.csv)"


def _ignored(path: Path) -> bool:
    """Hidden files and folders and the desktop's thumbnail caches are not part of the data."""
    return path.name.startswith(".") or path.name.lower() == "thumbs.db"


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def looks_like_image_folder(root: Path) -> bool:
    """Whether a folder has at least one visible sub-folder holding an image file."""
    return any(
        folder.is_dir() and not _ignored(folder) and any(_is_image(path) for path in folder.iterdir())
        for folder in Path(root).iterdir()
    )


def _read_groups(root: Path, image_paths: set[str], bad_rows: BadRows) -> dict[str, str]:
    """Group ids by relative image path from `groups.csv`; rows naming no image are bad rows."""
    groups_csv = read_csv_file(root / GROUPS_FILE, ("image", "group"), what="groups file (columns image, group)")
    groups: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for row in groups_csv.rows:
        image = row.values["image"].replace("\\", "/").removeprefix("./")
        if image in groups:
            raise DataError(
                f"{groups_csv.path} lines {first_line[image]} and {row.line} both give the group of {image!r}; "
                "keep one row per image"
            )
        if image not in image_paths:
            bad_rows.add(
                groups_csv.source(row),
                f"missing image {image!r}: not an image in a class folder of {root}",
                "give the path relative to the dataset folder (like mel/img_001.jpg) or remove the row",
            )
            continue
        groups[image] = row.values["group"]
        first_line[image] = row.line
    return groups


def read_image_folder(root: Path, *, skip_bad: bool = False) -> ImageTable:
    """Read a class-per-folder export: labels from folder names, lesion groups from groups.csv."""
    root = require_folder(root, "class-folder", EXPECTED_LAYOUT)
    bad_rows = BadRows(skip_bad)
    class_folders = []
    for path in sorted(root.iterdir()):
        if _ignored(path) or path.name == GROUPS_FILE:
            continue
        if path.is_dir():
            class_folders.append(path)
        else:
            bad_rows.add(
                str(path), "file outside a class folder has no class", "move it into the folder of its class or remove it"
            )
    if not class_folders:
        raise DataError(f"{root} has no class sub-folders; a folder dataset holds {EXPECTED_LAYOUT}")
    images: list[tuple[str, Path]] = []
    for folder in class_folders:
        found = []
        for path in sorted(folder.iterdir()):
            if _ignored(path):
                continue
            if _is_image(path):
                found.append(path)
            else:
                bad_rows.add(str(path), "not a .jpg/.jpeg/.png image", "remove it, or convert it to JPEG or PNG")
        if not found:
            raise DataError(
                f"empty class {folder.name!r}: {folder} holds no .jpg/.jpeg/.png images; "
                "add the class's images or remove the folder"
            )
        images.extend((folder.name, path) for path in found)
    relative_paths = {f"{label}/{path.name}" for label, path in images}
    groups = _read_groups(root, relative_paths, bad_rows) if (root / GROUPS_FILE).is_file() else {}
    skipped = bad_rows.raise_unless_skipping()
    entries = []
    for label, path in images:
        image_id = f"{label}/{path.stem}"
        entries.append(
            TableEntry(
                source=str(path),
                image_id=image_id,
                path=path,
                label=label,
                group=groups.get(f"{label}/{path.name}") or image_id,
                site="",
            )
        )
    return build_table(
        entries,
        classes=[folder.name for folder in class_folders],
        format_name="folder",
        root=root,
        skipped=skipped,
        empty_fix=f"the folder must hold {EXPECTED_LAYOUT}",
    )
