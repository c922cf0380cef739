"""End to end: a real Flower simulation (the shared `demo_simulation`) writes every site's local report and the coordinator's aggregate one.

Each site's report covers the global and the personalised model; the coordinator's holds aggregates only.
"""

import json

import pytest

from client.report import REPORT_FILES

pytestmark = pytest.mark.slow


def test_simulation_writes_every_site_report_and_an_aggregate_only_coordinator_report(demo_simulation):
    run_folder = demo_simulation.run_folder
    manifest = json.loads((run_folder / "sites" / "manifest.json").read_text())
    site_names = [entry["name"] for entry in manifest["sites"]]
    assert len(site_names) == 3
    site_examples = {}
    for site in site_names:
        report = run_folder / "sites" / site / "report"
        for name in REPORT_FILES:
            assert (report / name).is_file() and (report / name).stat().st_size > 0, f"{site}: {name}"
        metrics = json.loads((report / "metrics.json").read_text())
        assert metrics["site"] == site and metrics["round"] == 2  # the run's last round
        assert 0.0 <= metrics["isic"]["aggregate"]["balanced_accuracy"] <= 1.0
        assert set(metrics["isic"]["per_category"]) == set(metrics["classes"])
        gallery = (report / "gallery.html").read_text()
        assert gallery.count("<img") == 2 * metrics["gallery"]["images"] > 0
        assert "http://" not in gallery and "https://" not in gallery  # opens offline
        # The site's personalised model: saved for its web app, reported beside the global one.
        assert (report / "personalised_model.pt").stat().st_size > 0
        personalised = json.loads((report / "personalised" / "metrics.json").read_text())
        side_by_side = metrics["personalised"]["balanced_accuracy"]
        assert side_by_side == {
            "global": metrics["metrics"]["balanced_accuracy"], "personalised": personalised["metrics"]["balanced_accuracy"]
        }
        site_examples[site] = metrics["num_examples"]

    coordinator = run_folder / "report"
    for name in ("report.json", "confusion_matrix.png", "per_class.csv", "per_class.txt"):
        assert (coordinator / name).is_file(), name
    aggregate = json.loads((coordinator / "report.json").read_text())
    assert set(aggregate["sites"]) == set(site_names)
    assert aggregate["num_examples"] == sum(site_examples.values())
    assert {site: entry["num_examples"] for site, entry in aggregate["sites"].items()} == site_examples
    assert aggregate["failed_sites"] == []
    # Aggregate only: no gallery, no image identifiers in what the coordinator holds.
    assert not (coordinator / "gallery.html").exists()
    coordinator_text = json.dumps(aggregate)
    for entry in manifest["sites"]:
        with open(entry["table_csv"]) as handle:
            header, first_row = handle.readline().strip().split(","), handle.readline().strip().split(",")
        assert first_row[header.index("image_id")] not in coordinator_text
