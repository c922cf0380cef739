"""Simulated hospital sites: natural (the data's own site column) and Dirichlet non-IID partitions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared.data.partition import (
    class_count_table,
    format_count_table,
    groups_spanning_sites,
    partition_dirichlet,
    partition_natural,
)
from shared.data.records import ImageTable
from shared.errors import ConfigError, DataError

CLASSES = ["akiec", "mel", "nv", "vasc"]


def make_table(groups_per_class: dict[str, int], sites: tuple[str, ...] = ("",), images_per_group: int = 2) -> ImageTable:
    """Lesions per class, each photographed `images_per_group` times, dealt to `sites` in turn."""
    rows = []
    for label, count in groups_per_class.items():
        for lesion in range(count):
            for view in range(images_per_group):
                image_id = f"{label}_{lesion}_{view}"
                site = sites[lesion % len(sites)]
                rows.append(
                    {"image_id": image_id, "path": f"/data/{image_id}.jpg", "label": label, "group": f"{label}_{lesion}", "site": site}
                )
    return ImageTable(frame=pd.DataFrame(rows), classes=CLASSES, format="ham10000", root=Path("/data"))


def assert_whole_groups_each_image_once(table: ImageTable, sites: dict[str, ImageTable]) -> None:
    assigned = pd.concat([site.frame.assign(partition=name) for name, site in sites.items()])
    assert sorted(assigned["image_id"]) == sorted(table.frame["image_id"])
    assert assigned.groupby("group")["partition"].nunique().max() == 1


def test_natural_partition_has_one_site_per_value_in_sorted_order():
    table = make_table({"nv": 9, "mel": 4}, sites=("vienna", "barcelona", "queensland"))
    sites = partition_natural(table)
    assert list(sites) == ["barcelona", "queensland", "vienna"]
    assert_whole_groups_each_image_once(table, sites)
    assert all(set(site.frame["site"]) == {name} for name, site in sites.items())
    assert all(site.classes == CLASSES for site in sites.values())


def test_natural_partition_needs_a_site_column():
    with pytest.raises(DataError, match=r"names no sites \(column 'site' is empty or absent\); use --partition dirichlet"):
        partition_natural(make_table({"nv": 3}))
    with pytest.raises(DataError, match=r"column 'centre' is empty or absent"):
        partition_natural(make_table({"nv": 3}, sites=("a",)), column="centre")


def test_natural_partition_rejects_images_without_a_site():
    table = make_table({"nv": 4}, sites=("a", ""))
    with pytest.raises(DataError, match=r"4 of 8 images have no 'site' value .* or use --partition dirichlet"):
        partition_natural(table)


def test_natural_partition_keeps_a_lesion_photographed_at_two_sites_at_both():
    table = make_table({"nv": 4}, sites=("a", "b"))
    table.frame.loc[table.frame["image_id"] == "nv_0_1", "site"] = "b"
    sites = partition_natural(table)
    assert "nv_0_1" in set(sites["b"].frame["image_id"]) and "nv_0_0" in set(sites["a"].frame["image_id"])
    assert groups_spanning_sites(sites) == ["nv_0"]


def test_dirichlet_partition_assigns_whole_groups_once_to_named_sites():
    table = make_table({"nv": 40, "mel": 12, "akiec": 6, "vasc": 4})
    sites = partition_dirichlet(table, num_sites=4, alpha=0.5, seed=0)
    assert list(sites) == ["site_1", "site_2", "site_3", "site_4"]
    assert_whole_groups_each_image_once(table, sites)
    assert all(len(site) > 0 for site in sites.values())


def test_dirichlet_partition_is_seeded():
    table = make_table({"nv": 40, "mel": 12})
    def images_per_site(seed: int) -> dict[str, list[str]]:
        sites = partition_dirichlet(table, num_sites=3, alpha=0.5, seed=seed)
        return {name: list(site.frame["image_id"]) for name, site in sites.items()}

    assert images_per_site(1) == images_per_site(1)
    assert images_per_site(1) != images_per_site(2)


def test_dirichlet_partition_fills_every_site_even_with_tiny_alpha():
    table = make_table({"nv": 3, "mel": 2})
    for seed in range(10):
        sites = partition_dirichlet(table, num_sites=5, alpha=0.01, seed=seed)
        assert all(len(site) == 2 for site in sites.values())


def mean_distance_from_overall_mix(alpha: float) -> float:
    """Average total-variation distance between each site's class mix and the dataset's."""
    table = make_table({"nv": 120, "mel": 60, "akiec": 40, "vasc": 30}, images_per_group=1)
    overall = np.array(list(table.class_counts().values()), float) / len(table)
    distances = []
    for seed in range(5):
        for site in partition_dirichlet(table, num_sites=4, alpha=alpha, seed=seed).values():
            mix = np.array(list(site.class_counts().values()), float) / len(site)
            distances.append(0.5 * np.abs(mix - overall).sum())
    return float(np.mean(distances))


def test_smaller_alpha_gives_more_skewed_sites():
    skewed, mild, near_iid = (mean_distance_from_overall_mix(alpha) for alpha in (0.1, 1.0, 100.0))
    assert skewed > mild > near_iid
    assert near_iid < 0.1 < 0.3 < skewed


def test_dirichlet_partition_rejects_bad_settings():
    table = make_table({"nv": 3})
    with pytest.raises(ConfigError, match="num_sites 0 must be at least 1"):
        partition_dirichlet(table, num_sites=0, alpha=0.5, seed=0)
    with pytest.raises(ConfigError, match="Dirichlet alpha 0 must be a positive number"):
        partition_dirichlet(table, num_sites=2, alpha=0, seed=0)
    with pytest.raises(DataError, match="3 lesion/patient groups cannot fill 4 sites; use fewer sites"):
        partition_dirichlet(table, num_sites=4, alpha=0.5, seed=0)


def test_class_count_table_totals_and_text():
    table = make_table({"nv": 9, "mel": 4, "vasc": 1}, sites=("clinic_a", "clinic_b"))
    counts = class_count_table(partition_natural(table))
    assert list(counts.index) == ["clinic_a", "clinic_b", "total"]
    assert list(counts.columns) == [*CLASSES, "total"]
    assert counts.loc["total", "total"] == len(table)
    assert counts.loc["clinic_a", "total"] == 2 * (5 + 2 + 1) and counts.loc["clinic_b", "vasc"] == 0
    assert (counts.loc["total", CLASSES] == counts.loc[["clinic_a", "clinic_b"], CLASSES].sum()).all()
    text = format_count_table(counts)
    lines = text.splitlines()
    assert lines[0].split() == ["site", *CLASSES, "total"]
    assert lines[-1].split() == ["total", "0", "8", "18", "2", "28"]
    assert set(lines[-2]) == {"-"} and len({len(line) for line in lines}) == 1
