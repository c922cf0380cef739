"""Train/val/test splits that keep every lesion (or patient) in one split, stratified by class."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from shared.data.records import SPLITS, ImageTable
from shared.errors import ConfigError, DataError


def group_labels(table: ImageTable) -> pd.Series:
    """The class of every group: its most common label (ties go to the earlier class)."""
    order = {name: index for index, name in enumerate(table.classes)}
    counts = table.frame.groupby(["group", "label"]).size().reset_index(name="images")
    counts["class_order"] = counts["label"].map(lambda label: order.get(label, len(order)))
    counts = counts.sort_values(["group", "images", "class_order", "label"], ascending=[True, False, True, True])
    return counts.drop_duplicates("group").set_index("group")["label"]


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    try:
        values = tuple(float(part) for part in fractions)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or any(not part > 0 for part in values) or not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        raise ConfigError(
            f"split fractions {fractions!r} must be three positive numbers (train, val, test) summing to 1, "
            "e.g. 0.7,0.15,0.15"
        )
    return values


def _split_sizes(num_groups: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """Groups of one class per split: at least one each from 3 groups up; fewer go to train, then test."""
    if num_groups == 1:
        return 1, 0, 0
    if num_groups == 2:
        # The second group goes to test so the class can be measured there.
        return 1, 0, 1
    val = max(1, round(num_groups * fractions[1]))
    test = max(1, round(num_groups * fractions[2]))
    while num_groups - val - test < 1:
        if val >= test:
            val -= 1
        else:
            test -= 1
    return num_groups - val - test, val, test


def split_by_group(table: ImageTable, *, fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0) -> ImageTable:
    """A copy of the table with a `split` column (train/val/test), grouped and stratified by class.

    Groups are dealt to splits per class (a group's class is its most common label), so no group
    spans two splits and every class with at least 3 groups is in each split. The same seed
    gives the same split.
    """
    fractions = _check_fractions(fractions)
    if len(table) == 0:
        raise DataError(f"{table.root}: no images to split; check the dataset folder")
    rng = np.random.default_rng(seed)
    labels = group_labels(table)
    order = {name: index for index, name in enumerate(table.classes)}
    split_of_group: dict[str, str] = {}
    for label in sorted(set(labels), key=lambda name: (order.get(name, len(order)), name)):
        groups = np.array(sorted(labels.index[labels == label]), dtype=object)
        groups = groups[rng.permutation(len(groups))]
        train, val, _ = _split_sizes(len(groups), fractions)
        for position, group in enumerate(groups):
            split_of_group[group] = SPLITS[0] if position < train else SPLITS[1] if position < train + val else SPLITS[2]
    frame = table.frame.copy()
    frame["split"] = frame["group"].map(split_of_group)
    return ImageTable(frame=frame, classes=list(table.classes), format=table.format, root=table.root, skipped=list(table.skipped))


def check_group_disjoint(table: ImageTable) -> None:
    """Raise when a group (lesion or patient) has images in more than one split."""
    if "split" not in table.frame.columns:
        raise DataError(f"{table.root}: the table has no split column; split it with split_by_group first")
    splits_per_group = table.frame.groupby("group")["split"].nunique()
    leaking = sorted(splits_per_group.index[splits_per_group > 1])
    if leaking:
        shown = ", ".join(repr(group) for group in leaking[:5])
        more = f" and {len(leaking) - 5} more" if len(leaking) > 5 else ""
        raise DataError(
            f"{len(leaking)} lesion/patient group(s) have images in more than one split ({shown}{more}); "
            "split the table with split_by_group so each group stays in one split"
        )


def split_sites_by_group(
    sites: dict[str, ImageTable], *, fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0
) -> dict[str, ImageTable]:
    """Split every site by group; a group with images at several sites gets one split everywhere.

    Such a group takes the split it drew at the site that holds most of its images, so no
    lesion is in the training split of one site and the test split of another.
    """
    split = {name: split_by_group(site, fractions=fractions, seed=seed) for name, site in sites.items()}
    rows = pd.concat([site.frame.assign(_site=name) for name, site in split.items()], ignore_index=True)
    sites_per_group = rows.groupby("group")["_site"].nunique()
    for group in sites_per_group.index[sites_per_group > 1]:
        images = rows[rows["group"] == group]
        majority_site = images["_site"].value_counts().sort_index().idxmax()
        chosen = images.loc[images["_site"] == majority_site, "split"].iloc[0]
        for site in split.values():
            site.frame.loc[site.frame["group"] == group, "split"] = chosen
    return split
