"""Turn one dataset into simulated hospital sites: partition, lesion-grouped splits, caches, manifest."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from shared.config import RunConfig
from shared.data.cache import CachedImages
from shared.data.partition import (
    class_count_table,
    format_count_table,
    groups_spanning_sites,
    partition_dirichlet,
    partition_natural,
)
from shared.data.records import ImageTable
from shared.data.splits import split_sites_by_group
from shared.errors import ConfigError
from shared.run_folder import RunFolder
from shared.site_data import prepare_site_images, save_table_csv


@dataclass
class SimulatedSites:
    """The sites of a simulation: split tables, cached images and the manifest the ClientApp reads."""

    tables: dict[str, ImageTable]
    images: dict[str, CachedImages]
    manifest_path: Path
    count_table: str


def partition_sites(
    table: ImageTable, *, partition: str, num_sites: int | None, alpha: float, column: str, seed: int
) -> dict[str, ImageTable]:
    """Split a dataset into sites by its own site column or by Dirichlet(alpha) over classes."""
    if partition == "natural":
        sites = partition_natural(table, column=column)
        if num_sites is not None and num_sites != len(sites):
            raise ConfigError(
                f"--num-sites {num_sites} does not match the {len(sites)} sites the data names "
                f"({', '.join(sites)}); drop --num-sites or use --partition dirichlet"
            )
        return sites
    if partition == "dirichlet":
        if num_sites is None:
            raise ConfigError("--partition dirichlet needs --num-sites N")
        return partition_dirichlet(table, num_sites=num_sites, alpha=alpha, seed=seed)
    raise ConfigError(f"unknown partition {partition!r}; use natural or dirichlet")


def prepare_simulated_sites(
    sites: dict[str, ImageTable],
    run: RunConfig,
    *,
    run_folder: Path,
    cache_root: Path,
    threads_per_site: int,
    skip_bad: bool = False,
) -> SimulatedSites:
    """Split every site by lesion, build its image cache, and write the tables and manifest."""
    shared_lesions = groups_spanning_sites(sites)
    if shared_lesions:
        print(
            f"{len(shared_lesions)} lesion(s) have images at two or more sites (e.g. {shared_lesions[0]}): "
            "kept at each site, in the same split everywhere"
        )
    split_tables = split_sites_by_group(sites, fractions=run.split_fractions, seed=run.seed)
    layout = RunFolder(run_folder)
    sites_folder = layout.sites
    images: dict[str, CachedImages] = {}
    entries = []
    for name, site in split_tables.items():

        def prepare(table: ImageTable) -> CachedImages:
            return prepare_site_images(
                table,
                site=name,
                classes=run.classes,
                split_fractions=run.split_fractions,
                seed=run.seed,
                cache_root=cache_root,
                preprocess=run.preprocess,
                skip_bad=skip_bad,
            )

        images[name] = prepare(site)
        if images[name].skipped:
            # Sites read the saved table; drop what was skipped so their cache check matches.
            skipped = images[name].skipped
            site = site.subset(site.frame["image_id"].isin(set(images[name].image_ids)).to_numpy())
            split_tables[name] = site
            images[name] = prepare(site)
            images[name].skipped = skipped
        table_csv = save_table_csv(site, sites_folder / f"{len(entries):02d}_table.csv")
        entries.append({"name": name, "table_csv": str(table_csv.resolve())})
    counts = class_count_table(split_tables)
    counts.to_csv(Path(run_folder) / "site_class_counts.csv")
    split_counts = {
        f"{name} [{split}]": site.subset((site.frame["split"] == split).to_numpy())
        for name, site in split_tables.items()
        for split in ("train", "val", "test")
    }
    class_count_table(split_counts).to_csv(Path(run_folder) / "site_split_class_counts.csv")
    text = format_count_table(counts)
    (Path(run_folder) / "site_class_counts.txt").write_text(text + "\n")
    manifest = {"cache_root": str(Path(cache_root).resolve()), "threads_per_site": threads_per_site, "sites": entries}
    manifest_path = layout.manifest
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return SimulatedSites(split_tables, images, manifest_path, text)


def natural_site_images(data: Path, image_size: int, cache_dir: Path, seed: int) -> tuple[dict, list[str]]:
    """The natural sites of a HAM10000 folder as cached images (split by lesion with `seed`), and the classes.

    Benchmarks use it to read the same cache the simulations build (under `cache_dir / "images"`).
    """
    import tempfile

    from shared.config import PreprocessConfig
    from shared.data.readers import read_dataset

    table = read_dataset(data, "ham10000")
    run = RunConfig(classes=table.classes, preprocess=PreprocessConfig(image_size=image_size), seed=seed)
    sites = partition_sites(table, partition="natural", num_sites=None, alpha=0.5, column="site", seed=seed)
    with tempfile.TemporaryDirectory() as folder:
        simulated = prepare_simulated_sites(sites, run, run_folder=Path(folder), cache_root=Path(cache_dir) / "images", threads_per_site=1)
    return simulated.images, table.classes
