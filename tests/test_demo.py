"""The procedural demo dataset: deterministic, class-dependent images in the real on-disk formats."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from shared.data.demo import (
    DEMO_VERSION,
    HAM_LIKE_PROPORTIONS,
    _class_counts,
    ensure_demo_dataset,
    render_lesion,
    write_demo_dataset,
)
from shared.data.ham10000 import HAM10000_CLASSES, read_ham10000
from shared.errors import ConfigError

SMALL = {"width": 48, "height": 36}


def centre_colour(label: str, seeds: range) -> np.ndarray:
    """Mean RGB of the middle of several rendered lesions of one class."""
    means = []
    for seed in seeds:
        pixels = np.asarray(render_lesion(label, np.random.default_rng(seed), 64, 48), dtype=float)
        means.append(pixels[16:32, 22:42].reshape(-1, 3).mean(axis=0))
    return np.mean(means, axis=0)


def test_render_lesion_is_deterministic_by_seed_and_sized():
    first = render_lesion("mel", np.random.default_rng(3), 80, 60)
    again = render_lesion("mel", np.random.default_rng(3), 80, 60)
    other = render_lesion("mel", np.random.default_rng(4), 80, 60)
    assert first.size == (80, 60) and first.mode == "RGB"
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != other.tobytes()


def test_render_lesion_colour_depends_on_class():
    colours = {label: centre_colour(label, range(10)) for label in ("mel", "nv", "df", "vasc")}
    brightness = {label: colour.mean() for label, colour in colours.items()}
    assert brightness["mel"] < brightness["nv"] - 15, "melanomas are darker than naevi"
    assert brightness["df"] > brightness["nv"] + 25, "dermatofibromas have a light centre"
    blue_minus_green = {label: colour[2] - colour[1] for label, colour in colours.items()}
    assert blue_minus_green["vasc"] > blue_minus_green["nv"] + 15, "vascular lesions are red-purple"


def test_render_lesion_has_dark_dermoscope_corners():
    pixels = np.asarray(render_lesion("nv", np.random.default_rng(0), 64, 48), dtype=float)
    assert pixels[0, 0].mean() < 40 and pixels[24, 5].mean() > 100


def test_render_lesion_rejects_unknown_class():
    with pytest.raises(ConfigError, match=r"no demo drawing for class 'scc'; use one of akiec"):
        render_lesion("scc", np.random.default_rng(0))


def test_write_demo_dataset_is_deterministic_by_seed(tmp_path):
    first = write_demo_dataset(tmp_path / "a", num_images=60, seed=1, **SMALL)
    again = write_demo_dataset(tmp_path / "b", num_images=60, seed=1, **SMALL)
    other = write_demo_dataset(tmp_path / "c", num_images=60, seed=2, **SMALL)
    metadata = "HAM10000_metadata.csv"
    assert (first / metadata).read_text() == (again / metadata).read_text()
    assert (first / metadata).read_text() != (other / metadata).read_text()
    image = "images/ISIC_0024306.jpg"
    assert (first / image).read_bytes() == (again / image).read_bytes()
    assert (first / image).read_bytes() != (other / image).read_bytes()


def test_write_demo_dataset_writes_real_ham10000_metadata(tmp_path):
    root = write_demo_dataset(tmp_path / "ham", num_images=120, num_sites=4, **SMALL)
    with (root / "HAM10000_metadata.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"]
    assert len(rows) == 120
    assert {row["dataset"] for row in rows} == {f"demo_clinic_{number}" for number in range(1, 5)}
    counts = {label: sum(row["dx"] == label for row in rows) for label in HAM10000_CLASSES}
    assert min(counts.values()) >= 8
    assert max(counts, key=counts.get) == "nv"
    lesions = [row["lesion_id"] for row in rows]
    assert len(set(lesions)) < len(lesions), "some lesions have two images"
    assert set(HAM_LIKE_PROPORTIONS) == set(HAM10000_CLASSES)


def test_write_demo_dataset_follows_ham_proportions_at_default_size():
    counts = _class_counts(700, 8)
    assert sum(counts.values()) == 700
    assert counts["mel"] == 77 and counts["df"] == 8 and 460 < counts["nv"] < 480


def test_write_demo_dataset_rejects_bad_requests(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot hold 8 images of each of 7 classes; ask for at least 56"):
        write_demo_dataset(tmp_path / "few", num_images=50)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"is not an empty folder"):
        write_demo_dataset(tmp_path / "used", num_images=60)
    with pytest.raises(ConfigError, match=r"layout 'parts' is not available for folder"):
        write_demo_dataset(tmp_path / "x", format="folder", layout="parts")
    with pytest.raises(ConfigError, match=r"unknown demo format 'isic2018'"):
        write_demo_dataset(tmp_path / "x", format="isic2018")


def test_ensure_demo_dataset_writes_once_and_rewrites_when_parameters_change(tmp_path):
    cache = tmp_path / "cache"
    root = ensure_demo_dataset(cache, num_images=60, num_sites=2)
    stamp = root / "demo.json"
    assert f'"demo_version": {DEMO_VERSION}' in stamp.read_text()
    table = read_ham10000(root)
    assert len(table) == 60 and table.frame["site"].nunique() == 2
    written = stamp.stat().st_mtime_ns
    assert ensure_demo_dataset(cache, num_images=60, num_sites=2) == root
    assert stamp.stat().st_mtime_ns == written
    assert len(read_ham10000(ensure_demo_dataset(cache, num_images=64, num_sites=2))) == 64
    assert sorted(path.name for path in cache.iterdir()) == ["ham10000"], "no staging folders left behind"
