"""Partitioning one dataset into simulated hospital sites: by its own site column or Dirichlet non-IID."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from shared.data.records import ImageTable
from shared.data.splits import group_labels
from shared.errors import ConfigError, DataError


def partition_natural(table: ImageTable, column: str = "site") -> dict[str, ImageTable]:
    """One site per distinct value of the data's own site column, in sorted order.

    Images stay where the data puts them, also when one lesion was photographed at two sites
    (HAM10000 has four such lesions); `split_sites_by_group` then keeps such a lesion in one split.
    """
    frame = table.frame
    if column not in frame.columns or (frame[column] == "").all():
        raise DataError(
            f"{table.root}: the {table.format} data names no sites (column {column!r} is empty or absent); "
            "use --partition dirichlet --num-sites N to make simulated sites"
        )
    unnamed = frame[column] == ""
    if unnamed.any():
        raise DataError(
            f"{table.root}: {int(unnamed.sum())} of {len(frame)} images have no {column!r} value "
            f"(for example {frame.loc[unnamed, 'image_id'].iloc[0]!r}); fill it in, or use --partition dirichlet"
        )
    return {str(site): table.subset((frame[column] == site).to_numpy()) for site in sorted(frame[column].unique())}


def partition_dirichlet(table: ImageTable, *, num_sites: int, alpha: float, seed: int) -> dict[str, ImageTable]:
    """Non-IID sites `site_1..site_N`: per class, whole groups dealt in Dirichlet(alpha) proportions.

    Smaller alpha gives each site fewer classes. A site left empty takes one group from the
    site with the most groups, so every site has at least one image.
    """
    if num_sites < 1:
        raise ConfigError(f"num_sites {num_sites} must be at least 1")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ConfigError(f"Dirichlet alpha {alpha} must be a positive number (e.g. 0.5; larger is closer to IID)")
    labels = group_labels(table)
    if len(labels) < num_sites:
        raise DataError(
            f"{table.root}: {len(labels)} lesion/patient groups cannot fill {num_sites} sites; "
            "use fewer sites or more data"
        )
    rng = np.random.default_rng(seed)
    order = {name: index for index, name in enumerate(table.classes)}
    groups_of_site: list[list[str]] = [[] for _ in range(num_sites)]
    for label in sorted(set(labels), key=lambda name: (order.get(name, len(order)), name)):
        groups = np.array(sorted(labels.index[labels == label]), dtype=object)
        groups = groups[rng.permutation(len(groups))]
        shares = rng.dirichlet(np.full(num_sites, float(alpha)))
        cuts = (np.cumsum(shares)[:-1] * len(groups)).round().astype(int)
        for site, dealt in enumerate(np.split(groups, cuts)):
            groups_of_site[site].extend(dealt.tolist())
    for groups in groups_of_site:
        if not groups:
            donor = max(range(num_sites), key=lambda index: len(groups_of_site[index]))
            groups.append(groups_of_site[donor].pop(rng.integers(len(groups_of_site[donor]))))
    site_of_group = {group: site for site, groups in enumerate(groups_of_site) for group in groups}
    site_index = table.frame["group"].map(site_of_group).to_numpy()
    return {f"site_{site + 1}": table.subset(site_index == site) for site in range(num_sites)}


def class_count_table(sites: dict[str, ImageTable]) -> pd.DataFrame:
    """Images per site and class: rows are the sites and "total", columns the classes and "total"."""
    classes: list[str] = []
    for table in sites.values():
        classes.extend(name for name in table.classes if name not in classes)
    rows = {name: [table.class_counts().get(label, 0) for label in classes] for name, table in sites.items()}
    counts = pd.DataFrame.from_dict(rows, orient="index", columns=classes).astype(int)
    counts.loc["total"] = counts.sum(axis=0)
    counts["total"] = counts.sum(axis=1)
    counts.index.name = "site"
    return counts


def format_count_table(frame: pd.DataFrame) -> str:
    """A count table as aligned plain text, with a rule above the total row."""
    header = [frame.index.name or "", *map(str, frame.columns)]
    body = [[str(name), *(str(int(value)) for value in row)] for name, row in zip(frame.index, frame.to_numpy())]
    widths = [max(len(line[column]) for line in [header, *body]) for column in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(cell.rjust(width) for cell, width in zip(cells[1:], widths[1:]))])

    lines = [line(header)]
    for name, cells in zip(frame.index, body):
        if name == "total":
            lines.append("-" * len(lines[0]))
        lines.append(line(cells))
    return "\n".join(lines)


def groups_spanning_sites(sites: dict[str, ImageTable]) -> list[str]:
    """Lesion/patient groups that have images at more than one site, sorted."""
    site_count: dict[str, int] = {}
    for site in sites.values():
        for group in site.frame["group"].unique():
            site_count[group] = site_count.get(group, 0) + 1
    return sorted(group for group, count in site_count.items() if count > 1)
