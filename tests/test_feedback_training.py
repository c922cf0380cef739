"""Clinician feedback as training data: the store's reader, train-only use, and no leak of held-out images."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.web.store import CaseRecord, FeedbackStore, utc_now
from shared.config import PreprocessConfig
from shared.data.demo import write_demo_dataset
from shared.data.feedback import feedback_summary, prepare_feedback_images, read_feedback
from shared.data.readers import read_dataset
from shared.errors import DataError
from shared.site_data import prepare_site_images
from web_support import CLASSES, lesion_image

PREPROCESS = PreprocessConfig(image_size=32)


@pytest.fixture
def site_images(tmp_path):
    root = write_demo_dataset(tmp_path / "site", format="folder", num_images=60, seed=3)
    table = read_dataset(root, "folder")
    images = prepare_site_images(
        table, site="clinic", classes=CLASSES, split_fractions=(0.6, 0.2, 0.2), seed=0,
        cache_root=tmp_path / "cache", preprocess=PREPROCESS, progress=False,
    )
    return table, images


def _add_case(store, image_file, *, predicted="nv", label=None, note=None):
    case_id = f"{len(store.list_cases()):032x}"
    target = store.path.parent / "images" / f"{case_id}{image_file.suffix}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(image_file, target)
    probabilities = {name: 1 / len(CLASSES) for name in CLASSES}
    store.add_cases([CaseRecord(case_id, store.relative_image_path(target), utc_now(), "dr.alice", "m@1", predicted, probabilities)])
    if label is not None:
        store.record_feedback(case_id, label=label, note=note, user="dr.bob")
    return case_id


def _new_lesion(tmp_path, name, label="df", seed=11):
    path = tmp_path / name
    lesion_image(label, seed).save(path, quality=90)
    return path


def test_reviewed_cases_train_pending_ones_wait_and_held_out_images_never_join(tmp_path, site_images):
    table, images = site_images
    store = FeedbackStore(tmp_path / "web" / "cases.sqlite")
    corrected = _add_case(store, _new_lesion(tmp_path, "new.jpg"), predicted="nv", label="df", note="=cmd")
    confirmed = _add_case(store, _new_lesion(tmp_path, "new2.jpg", "mel", 12), predicted="mel", label="mel")
    _add_case(store, _new_lesion(tmp_path, "new3.jpg", "bcc", 13), predicted="bcc")  # pending: not training data
    path_of = table.frame.set_index("image_id")["path"]
    test_file, val_file = Path(path_of[images.select("test").image_ids[0]]), Path(path_of[images.select("val").image_ids[0]])
    _add_case(store, test_file, predicted="nv", label="vasc")  # the same file as a test image, uploaded again
    reexported = tmp_path / "val_reexported.png"
    Image.open(val_file).save(reexported)  # the same picture exported again as PNG: different bytes, same lesion
    _add_case(store, reexported, predicted="nv", label="bkl")

    feedback = prepare_feedback_images(
        store.path, site="clinic", site_images=images, preprocess=PREPROCESS, cache_root=tmp_path / "cache"
    )
    assert feedback.used == 2 and feedback.held_out_duplicates == 2
    assert sorted(feedback.images.image_ids) == sorted([f"feedback/{corrected}", f"feedback/{confirmed}"])
    labels = dict(zip(feedback.images.image_ids, feedback.images.labels))
    assert CLASSES[labels[f"feedback/{corrected}"]] == "df" and CLASSES[labels[f"feedback/{confirmed}"]] == "mel"
    assert set(feedback.images.splits) == {"train"}
    assert feedback.images.images.shape == (2, 32, 32, 3) and feedback.images.images.dtype == np.uint8
    assert feedback_summary(feedback) == {
        "feedback_enabled": True, "feedback_cases_used": 2, "feedback_held_out_duplicates": 2, "feedback_cases_skipped": 0
    }
    assert feedback_summary(None)["feedback_enabled"] is False
    # The site's own splits are untouched: the held-out splits hold no feedback case.
    for split in ("val", "test"):
        assert not any(image_id.startswith("feedback/") for image_id in images.select(split).image_ids)


def test_no_reviewed_cases_means_no_extra_images(tmp_path, site_images):
    _, images = site_images
    store = FeedbackStore(tmp_path / "cases.sqlite")
    _add_case(store, _new_lesion(tmp_path, "a.jpg"))
    feedback = prepare_feedback_images(store.path, site="clinic", site_images=images, preprocess=PREPROCESS, cache_root=tmp_path / "cache")
    assert feedback.images is None and feedback.used == 0 and feedback.held_out_duplicates == 0


def test_reader_errors_name_the_case_and_the_fix(tmp_path):
    store = FeedbackStore(tmp_path / "cases.sqlite")
    good = _add_case(store, _new_lesion(tmp_path, "a.jpg"), label="df")
    foreign = _add_case(store, _new_lesion(tmp_path, "b.jpg", seed=5), label="scc")
    with pytest.raises(DataError, match=f"case {foreign}: label 'scc' is not among the run's classes.*skip-bad"):
        read_feedback(store.path, CLASSES)
    table = read_feedback(store.path, CLASSES, skip_bad=True)
    assert list(table.frame["image_id"]) == [f"feedback/{good}"] and len(table.skipped) == 1
    (tmp_path / "images" / f"{good}.jpg").unlink()
    with pytest.raises(DataError, match="is missing"):
        read_feedback(store.path, CLASSES + ["scc"])
    with pytest.raises(DataError, match="does not exist.*cases.sqlite"):
        read_feedback(tmp_path / "none.sqlite", CLASSES)
    (tmp_path / "junk.sqlite").write_bytes(b"this is not a database at all" * 10)
    with pytest.raises(DataError, match="not a readable feedback store"):
        read_feedback(tmp_path / "junk.sqlite", CLASSES)
