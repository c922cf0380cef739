"""Tests of the per-site image cache: build, reuse without decoding, rebuilds, bad images, views."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import shared.data.cache as cache_module
from shared.config import PreprocessConfig
from shared.data.cache import CachedImages, build_image_cache, concatenate
from shared.data.records import ImageTable
from shared.errors import DataError

CLASSES = ["mel", "nv"]


def _write_table(folder: Path, count: int = 12, *, splits: bool = True) -> ImageTable:
    """`count` tiny JPEGs with alternating labels (and train/val/test splits interleaved)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for number in range(count):
        path = folder / f"img_{number:02d}.jpg"
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(path, quality=90)
        rows.append(
            {
                "image_id": f"img_{number:02d}",
                "path": str(path),
                "label": CLASSES[number % 2],
                "group": f"lesion_{number}",
                "site": "",
                **({"split": ("train", "val", "test")[number % 3]} if splits else {}),
            }
        )
    return ImageTable(frame=pd.DataFrame(rows), classes=list(CLASSES), format="folder", root=folder)


@pytest.fixture
def decode_calls(monkeypatch):
    """Counts calls of the real decoder made by the cache builder."""
    calls = []
    real_decode = cache_module.decode_image

    def counting_decode(path, **options):
        calls.append(Path(path).name)
        return real_decode(path, **options)

    monkeypatch.setattr(cache_module, "decode_image", counting_decode)
    return calls


def test_caching_writes_progress_lines_when_the_output_is_a_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SKIN_FL_PROGRESS_SECONDS", "0")
    build_image_cache(_write_table(tmp_path / "images"), tmp_path / "cache" / "site", PreprocessConfig(image_size=32))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("caching cache/site: at 1/12 (8 %), ") and lines[-1].startswith("caching cache/site: done 12/12 (100 %), ")
    assert len(lines) == 13 and not any("\x1b" in line for line in lines)


def test_build_writes_a_memory_mapped_cache_and_index(tmp_path):
    table = _write_table(tmp_path / "images")
    cached = build_image_cache(table, tmp_path / "cache", PreprocessConfig(image_size=32), progress=False)
    assert cached.images.shape == (12, 32, 32, 3) and cached.images.dtype == np.uint8
    assert isinstance(cached.images, np.memmap)
    assert len(cached) == 12 and cached.labels.dtype == np.int64
    assert sorted(cached.image_ids) == sorted(table.frame["image_id"])
    assert cached.classes == CLASSES
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert set(index) >= {"fingerprint", "image_ids", "labels", "splits", "classes", "skipped"}
    by_id = dict(zip(table.frame["image_id"], table.frame["label"]))
    assert [CLASSES[label] for label in cached.labels] == [by_id[image_id] for image_id in cached.image_ids]
    # Rows are grouped by split so every split is one slice of the file.
    assert list(cached.splits) == ["train"] * 4 + ["val"] * 4 + ["test"] * 4
    assert not [name for name in os.listdir(tmp_path / "cache") if name.endswith(".tmp")]


def test_unsplit_table_is_all_training_data(tmp_path):
    table = _write_table(tmp_path / "images", splits=False)
    cached = build_image_cache(table, tmp_path / "cache", PreprocessConfig(image_size=32), progress=False)
    assert set(cached.splits) == {"train"}


def test_unchanged_source_reuses_the_cache_without_decoding(tmp_path, decode_calls):
    table, cache_dir, options = _write_table(tmp_path / "images"), tmp_path / "cache", PreprocessConfig(image_size=32)
    first = build_image_cache(table, cache_dir, options, progress=False)
    assert len(decode_calls) == 12
    written = (cache_dir / "images.npy").stat().st_mtime_ns
    second = build_image_cache(table, cache_dir, options, progress=False)
    assert len(decode_calls) == 12
    assert (cache_dir / "images.npy").stat().st_mtime_ns == written
    assert np.array_equal(first.images, second.images) and first.image_ids == second.image_ids


def test_rewritten_or_touched_file_rebuilds(tmp_path, decode_calls):
    table, cache_dir, options = _write_table(tmp_path / "images"), tmp_path / "cache", PreprocessConfig(image_size=32)
    before = build_image_cache(table, cache_dir, options, progress=False)
    changed = Path(table.frame["path"][0])
    Image.new("RGB", (40, 30), (200, 30, 30)).save(changed)
    after = build_image_cache(table, cache_dir, options, progress=False)
    assert len(decode_calls) == 24
    row = after.image_ids.index("img_00")
    assert not np.array_equal(before.images[row], after.images[row])
    assert np.abs(after.images[row].astype(int) - [200, 30, 30]).max() <= 3
    status = changed.stat()
    os.utime(changed, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))
    build_image_cache(table, cache_dir, options, progress=False)
    assert len(decode_calls) == 36


@pytest.mark.parametrize("changed", [{"image_size": 48}, {"colour_constancy": True}, {"clahe": True}])
def test_changed_preprocessing_rebuilds(tmp_path, decode_calls, changed):
    table, cache_dir = _write_table(tmp_path / "images"), tmp_path / "cache"
    build_image_cache(table, cache_dir, PreprocessConfig(image_size=32), progress=False)
    rebuilt = build_image_cache(table, cache_dir, PreprocessConfig(**{"image_size": 32, **changed}), progress=False)
    assert len(decode_calls) == 24
    assert rebuilt.images.shape[1] == changed.get("image_size", 32)


def test_bad_image_fails_the_build_and_leaves_no_half_cache(tmp_path):
    table, cache_dir, options = _write_table(tmp_path / "images"), tmp_path / "cache", PreprocessConfig(image_size=32)
    build_image_cache(table, cache_dir, options, progress=False)
    bad = Path(table.frame["path"][5])
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DataError, match=r"img_05\.jpg.*--skip-bad"):
        build_image_cache(table, cache_dir, options, progress=False)
    assert sorted(os.listdir(cache_dir)) == ["images.npy", "index.json"]
    # The old cache no longer matches the changed source, so it is not reused.
    with pytest.raises(DataError, match=r"img_05\.jpg"):
        build_image_cache(table, cache_dir, options, progress=False)


def test_skip_bad_leaves_bad_images_out_and_lists_them(tmp_path, decode_calls):
    table, cache_dir, options = _write_table(tmp_path / "images"), tmp_path / "cache", PreprocessConfig(image_size=32)
    truncated = Path(table.frame["path"][4])
    truncated.write_bytes(truncated.read_bytes()[:200])
    Path(table.frame["path"][7]).unlink()
    cached = build_image_cache(table, cache_dir, options, skip_bad=True, progress=False)
    assert len(cached) == 10 and cached.images.shape[0] == 10
    assert "img_04" not in cached.image_ids and "img_07" not in cached.image_ids
    assert sorted(Path(row.source).name for row in cached.skipped) == ["img_04.jpg", "img_07.jpg"]
    assert any("truncated" in row.reason for row in cached.skipped)
    index = json.loads((cache_dir / "index.json").read_text())
    assert len(index["skipped"]) == 2 and len(index["image_ids"]) == 10
    reused = build_image_cache(table, cache_dir, options, skip_bad=True, progress=False)
    assert len(decode_calls) == 12 and len(reused.skipped) == 2
    with pytest.raises(DataError, match=r"2 image\(s\).*img_04\.jpg.*--skip-bad"):
        build_image_cache(table, cache_dir, options, progress=False)


def test_labels_outside_the_class_list_are_an_error(tmp_path):
    table = _write_table(tmp_path / "images")
    table.frame.loc[3, "label"] = "bcc"
    with pytest.raises(DataError, match=r"\['bcc'\] are not among the classes"):
        build_image_cache(table, tmp_path / "cache", PreprocessConfig(image_size=32), progress=False)


def test_select_gives_a_view_of_one_split(tmp_path):
    cached = build_image_cache(
        _write_table(tmp_path / "images"), tmp_path / "cache", PreprocessConfig(image_size=32), progress=False
    )
    validation = cached.select("val")
    assert len(validation) == 4 and set(validation.splits) == {"val"}
    assert validation.image_ids == ["img_01", "img_04", "img_07", "img_10"]
    assert np.shares_memory(validation.images, cached.images)
    assert "[val]" in validation.source
    assert list(validation.class_counts()) == [2, 2]
    with pytest.raises(ValueError, match="'validation' is not one of"):
        cached.select("validation")


def test_class_counts_include_absent_classes():
    images = CachedImages(
        images=np.zeros((3, 32, 32, 3), dtype=np.uint8),
        labels=np.array([0, 0, 2]),
        image_ids=["a", "b", "c"],
        splits=np.array(["train"] * 3),
        classes=["akiec", "bcc", "mel", "nv"],
    )
    assert list(images.class_counts()) == [2, 0, 1, 0]


def test_concatenate_pools_sites_with_the_same_classes(tmp_path):
    options = PreprocessConfig(image_size=32)
    site_a = build_image_cache(_write_table(tmp_path / "a", 12), tmp_path / "cache_a", options, progress=False)
    site_b = build_image_cache(_write_table(tmp_path / "b", 6), tmp_path / "cache_b", options, progress=False)
    pooled = concatenate([site_a.select("train"), site_b.select("train")])
    assert len(pooled) == 4 + 2 and pooled.images.shape == (6, 32, 32, 3)
    expected = site_a.select("train").class_counts() + site_b.select("train").class_counts()
    assert list(pooled.class_counts()) == list(expected)
    site_b.classes = ["nv", "mel"]
    with pytest.raises(DataError, match="cannot pool.*run's class list"):
        concatenate([site_a, site_b])
