"""The GAN ablation's table over seeds and its GPU script's refusal without CUDA (the arms themselves are real runs)."""

import os
import subprocess
from pathlib import Path

from simulation.gan_ablation import ARMS, RARE_CLASSES, summarise_seeds

REPOSITORY = Path(__file__).resolve().parents[1]


def _ablation(balanced_accuracy: float, rare: dict[str, dict[str, float]], frechet: float, tstr: float) -> dict:
    arms = {
        arm: {"balanced_accuracy": balanced_accuracy, "rare_macro_recall": sum(rare[arm].values()) / 3, "recall": rare[arm]}
        for arm in ARMS
    }
    return {"arms": arms, "gan": {"quality": {"frechet_distance": {"all": frechet}, "tstr": {"balanced_accuracy": tstr}}}}


def test_the_table_over_seeds_gives_mean_and_sd_and_the_cgan_gain_per_seed():
    def recalls(sampler: float, both: float) -> dict:
        return {arm: dict.fromkeys(RARE_CLASSES, both if arm == "d_both" else sampler) for arm in ARMS}

    text = summarise_seeds({
        0: _ablation(0.30, recalls(0.40, 0.45), 150.0, 0.17),
        1: _ablation(0.34, recalls(0.50, 0.49), 130.0, 0.21),
    })
    assert "seeds 0, 1" in text
    assert "| b_sampler | 2 | 0.320 ± 0.028 | 0.450 ± 0.071 |" in text
    assert "per seed: +0.050, -0.010; mean 0.020 ± 0.042" in text
    assert "Fréchet distance overall 140.000 ± 14.142" in text and "balanced accuracy 0.190 ± 0.028" in text


def test_the_gpu_script_refuses_to_run_without_cuda(tmp_path):
    script = REPOSITORY / "simulation" / "gpu_gan_ablation.sh"
    result = subprocess.run(
        ["bash", str(script), str(tmp_path / "data"), str(tmp_path / "out")], capture_output=True, text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode != 0 and "no CUDA device here" in result.stderr
    assert not (tmp_path / "out").exists()
