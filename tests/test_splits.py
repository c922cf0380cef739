"""Lesion-grouped, class-stratified, seeded train/val/test splits."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from shared.data.records import ImageTable
from shared.data.splits import check_group_disjoint, group_labels, split_by_group, split_sites_by_group
from shared.errors import ConfigError, DataError

CLASSES = ["akiec", "mel", "nv", "vasc"]


def make_table(groups_per_class: dict[str, int], images_per_group: int = 2) -> ImageTable:
    """A table with the given number of lesions per class, each photographed `images_per_group` times."""
    rows = []
    for label, count in groups_per_class.items():
        for lesion in range(count):
            for view in range(images_per_group):
                image_id = f"{label}_{lesion}_{view}"
                rows.append(
                    {"image_id": image_id, "path": f"/data/{image_id}.jpg", "label": label, "group": f"{label}_{lesion}", "site": ""}
                )
    return ImageTable(frame=pd.DataFrame(rows), classes=CLASSES, format="ham10000", root=Path("/data"))


def test_split_keeps_groups_together_and_covers_every_image():
    table = make_table({"nv": 60, "mel": 15, "akiec": 5, "vasc": 3}, images_per_group=3)
    split = split_by_group(table)
    assert len(split) == len(table) and set(split.frame["split"]) == {"train", "val", "test"}
    assert split.frame.groupby("group")["split"].nunique().max() == 1
    check_group_disjoint(split)
    assert "split" not in table.frame.columns, "the input table is left as it was"


def test_split_is_stratified_with_every_class_of_three_groups_in_every_split():
    split = split_by_group(make_table({"nv": 60, "mel": 15, "akiec": 5, "vasc": 3}))
    for label in CLASSES:
        assert set(split.frame.loc[split.frame["label"] == label, "split"]) == {"train", "val", "test"}, label
    nv_groups = split.frame[split.frame["label"] == "nv"].groupby("split")["group"].nunique()
    assert nv_groups.to_dict() == {"train": 42, "val": 9, "test": 9}


def test_split_sends_classes_with_few_groups_to_train_first():
    split = split_by_group(make_table({"nv": 10, "mel": 1, "vasc": 2}))
    assert set(split.frame.loc[split.frame["label"] == "mel", "split"]) == {"train"}
    assert set(split.frame.loc[split.frame["label"] == "vasc", "split"]) == {"train", "test"}


def test_split_is_deterministic_for_a_seed():
    table = make_table({"nv": 40, "mel": 12, "akiec": 6})
    first = split_by_group(table, seed=5).frame["split"]
    assert first.equals(split_by_group(table, seed=5).frame["split"])
    assert not first.equals(split_by_group(table, seed=6).frame["split"])


def test_split_follows_the_fractions():
    split = split_by_group(make_table({"nv": 100}, images_per_group=1), fractions=(0.5, 0.3, 0.2))
    assert split.frame["split"].value_counts().to_dict() == {"train": 50, "val": 30, "test": 20}


def test_group_class_is_its_most_common_label():
    table = make_table({"nv": 3})
    table.frame.loc[table.frame["image_id"] == "nv_0_0", "label"] = "mel"
    table.frame.loc[table.frame["image_id"] == "nv_1_0", "label"] = "mel"
    table.frame.loc[table.frame["image_id"] == "nv_1_1", "label"] = "mel"
    labels = group_labels(table)
    assert labels["nv_0"] == "mel", "a tie goes to the earlier class"
    assert labels["nv_1"] == "mel" and labels["nv_2"] == "nv"


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.7, 0.2, 0.2), (1.0, 0.0, 0.0), (0.8, 0.3, -0.1)])
def test_split_rejects_bad_fractions(fractions):
    with pytest.raises(ConfigError, match=r"must be three positive numbers \(train, val, test\) summing to 1"):
        split_by_group(make_table({"nv": 5}), fractions=fractions)


def test_check_group_disjoint_names_leaking_groups():
    split = split_by_group(make_table({"nv": 10}))
    split.frame.loc[split.frame["image_id"] == "nv_3_0", "split"] = "train"
    split.frame.loc[split.frame["image_id"] == "nv_3_1", "split"] = "test"
    with pytest.raises(DataError, match=r"1 lesion/patient group\(s\) have images in more than one split \('nv_3'\)"):
        check_group_disjoint(split)
    with pytest.raises(DataError, match="has no split column"):
        check_group_disjoint(make_table({"nv": 2}))


def test_a_lesion_at_two_sites_gets_one_split_at_both():
    site_a, site_b = make_table({"nv": 12, "mel": 6}), make_table({"nv": 12, "mel": 6})
    # lesion nv_3 has two images at site a and one at site b; site b's own split may differ
    site_b.frame = site_b.frame[site_b.frame["group"] != "nv_3"].reset_index(drop=True)
    shared_image = site_a.frame[site_a.frame["group"] == "nv_3"].iloc[[0]].assign(image_id="nv_3_at_b")
    site_b.frame = pd.concat([site_b.frame, shared_image], ignore_index=True)

    for seed in range(6):
        split = split_sites_by_group({"a": site_a, "b": site_b}, seed=seed)
        at_a = set(split["a"].frame.loc[split["a"].frame["group"] == "nv_3", "split"])
        at_b = set(split["b"].frame.loc[split["b"].frame["group"] == "nv_3", "split"])
        assert at_a == at_b and len(at_a) == 1
        for site in split.values():
            check_group_disjoint(site)
