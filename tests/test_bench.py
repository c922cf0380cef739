"""skin-fl-bench end to end on the demo dataset: cells, table files, resume, refusal to mix settings, GPU script on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.data.demo import ensure_demo_dataset
from simulation.bench import main as bench_main

TINY = ["--image-size", "32", "--rounds", "2", "--max-steps-per-epoch", "2", "--batch-size", "8"]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    return ensure_demo_dataset(tmp_path_factory.mktemp("demo"), num_images=120)


def _bench(out: Path, demo_data: Path, cache: Path, *extra: str) -> int:
    return bench_main(["--out", str(out), "--data", str(demo_data), "--cache-dir", str(cache), *TINY, *extra])


@pytest.mark.slow
def test_gpu_script_writes_cells_and_table_then_the_bench_skips_finished_cells(tmp_path, demo_data, capsys):
    out, cache = tmp_path / "bench", tmp_path / "cache"
    # The GPU headline script, run tiny on the CPU: pooled and FedAvg, one seed.
    environment = {
        **os.environ,
        "DEVICE": "cpu",
        "WORKERS": "0",
        "ROUNDS": "2",
        "IMAGE_SIZE": "32",
        "BENCH_ARGS": f"--max-steps-per-epoch 2 --batch-size 8 --cache-dir {cache}",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    script = Path(__file__).resolve().parents[1] / "simulation" / "gpu_headline.sh"
    finished = subprocess.run(
        ["bash", str(script), str(demo_data), str(out), "0"], env=environment, capture_output=True, text=True, timeout=600
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    cells = sorted(path.name for path in (out / "cells").glob("*.json"))
    assert cells == ["fedavg_seed0.json", "pooled_seed0.json"]
    cell = json.loads((out / "cells" / "fedavg_seed0.json").read_text())
    assert [entry["round"] for entry in cell["rounds"]] == [1, 2]
    assert 1 <= cell["selected_round"] <= 2
    assert set(cell["per_site"]) == {"demo_clinic_1", "demo_clinic_2", "demo_clinic_3"}
    assert cell["calibration"]["temperature"] > 0
    assert len(cell["calibration"]["prior_offsets"]) == 7 and cell["calibration"]["prior_corrected"]["balanced_accuracy"] >= 0
    refit = cell["calibration"]["head_refit"]
    assert len(refit["val_balanced_accuracy_by_query"]) == len(refit["test_balanced_accuracy_by_query"]) >= 2
    assert 0 <= refit["prior_corrected"]["balanced_accuracy"] <= 1 and "macro_auc" in refit["refitted_test"]
    table = (out / "table.md").read_text()
    assert "| pooled | 1 |" in table and "| fedavg | 1 |" in table
    assert (out / "table.png").stat().st_size > 0 and (out / "table.csv").exists()
    written = (out / "cells" / "pooled_seed0.json").stat().st_mtime_ns

    # The same settings with one more arm: the finished cells are kept, only the new one runs.
    assert _bench(out, demo_data, cache, "--arms", "pooled", "fedavg", "fedavgm", "--seeds", "0") == 0
    printed = capsys.readouterr().out
    assert "pooled seed 0: done earlier, kept" in printed and "fedavg seed 0: done earlier, kept" in printed
    assert (out / "cells" / "pooled_seed0.json").stat().st_mtime_ns == written
    assert (out / "cells" / "fedavgm_seed0.json").exists()


def test_bench_refuses_to_mix_cells_of_other_settings(tmp_path, demo_data, capsys):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "settings.json").write_text(json.dumps({"image_size": 64}))
    assert _bench(out, demo_data, tmp_path / "cache", "--arms", "pooled", "--seeds", "0") == 2
    assert "use another --out" in capsys.readouterr().err



def test_personalised_arm_reports_each_sites_tuned_and_global_model_side_by_side(tmp_path, demo_data):
    out = tmp_path / "bench"
    assert _bench(out, demo_data, tmp_path / "cache", "--arms", "personalised", "--seeds", "0", "--personalise-epochs", "0.5") == 0
    cell = json.loads((out / "cells" / "personalised_seed0.json").read_text())
    sites = {"demo_clinic_1", "demo_clinic_2", "demo_clinic_3"}
    assert set(cell["per_site"]) == sites and set(cell["per_site_global"]) == sites
    assert [entry["round"] for entry in cell["rounds"]] == [1, 2]
    assert "bal. acc (mean over sites, global model)" in (out / "table.md").read_text()
    assert "| personalised | 1 |" in (out / "table.md").read_text()


def test_an_interrupted_cell_continues_after_its_last_finished_round_with_the_same_figures(tmp_path, demo_data, monkeypatch):
    import simulation.arms as arms

    cache = tmp_path / "cache"
    # fp32 throughout: on a CPU, automatic precision picks bf16 by a timing, which a busy machine can flip.
    fixed = ("--arms", "fedavg", "--seeds", "0", "--amp", "off")
    assert _bench(tmp_path / "whole", demo_data, cache, *fixed) == 0
    whole = json.loads((tmp_path / "whole" / "cells" / "fedavg_seed0.json").read_text())
    assert whole["precisions"] == ["fp32"]  # each cell records the precision it trained in

    class Interrupted(Exception):
        pass

    def stop_after_round_one(*_args, **_kwargs):
        raise Interrupted

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        patch.setattr(arms, "_progress_line", stop_after_round_one)
        with pytest.raises(Interrupted):
            _bench(interrupted, demo_data, cache, *fixed)
    assert (interrupted / "cells" / "fedavg_seed0.partial.pt").is_file()
    assert not (interrupted / "cells" / "fedavg_seed0.json").exists()

    assert _bench(interrupted, demo_data, cache, *fixed) == 0
    resumed = json.loads((interrupted / "cells" / "fedavg_seed0.json").read_text())
    assert not (interrupted / "cells" / "fedavg_seed0.partial.pt").exists()
    assert resumed["rounds"] == whole["rounds"]
    assert resumed["per_site"] == whole["per_site"]
