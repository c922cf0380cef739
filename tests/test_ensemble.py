"""Ensembles of saved classifiers: which files a run folder gives, agreement checks, averaged probabilities and maps."""

import numpy as np
import pytest
import torch

from shared.config import ModelConfig, PreprocessConfig
from shared.ensemble import Ensemble, expand_model_paths, normalise_maps, normalise_pixels
from shared.errors import ModelError
from shared.models.classifier import build_classifier, save_classifier
from shared.run_folder import RunFolder

CLASSES = ["a", "b", "c"]


def _save(path, seed, classes=CLASSES, size=48):
    torch.manual_seed(seed)
    model = build_classifier(ModelConfig(name="test_efficientnet", pretrained="none"), num_classes=len(classes))
    return save_classifier(path, model, model_name="test_efficientnet", classes=classes, preprocess=PreprocessConfig(image_size=size))


def test_run_folder_gives_final_model_or_last_round_checkpoints_in_round_order(tmp_path):
    run = tmp_path / "run"
    for round_number in (1, 2, 10, 9):
        _save(run / "checkpoints" / f"round_{round_number:03d}.pt", round_number)
    assert [path.name for path in RunFolder(run).checkpoint_files().values()] == ["round_001.pt", "round_002.pt", "round_009.pt", "round_010.pt"]
    assert [path.name for path in expand_model_paths([run], last=2)] == ["round_009.pt", "round_010.pt"]
    assert expand_model_paths([run]) == [run / "final_model.pt"]
    with pytest.raises(ModelError, match="--last applies to run folders"):
        expand_model_paths([run / "checkpoints" / "round_001.pt"], last=2)
    with pytest.raises(ModelError, match="no checkpoints/round_NNN.pt"):
        expand_model_paths([tmp_path], last=1)


def test_ensemble_averages_member_probabilities_and_maps(tmp_path):
    paths = [_save(tmp_path / f"m{seed}.pt", seed) for seed in (1, 2)]
    ensemble = Ensemble.load(paths)
    single = [Ensemble.load([path]) for path in paths]
    images = normalise_pixels(np.random.default_rng(0).integers(0, 256, (4, 48, 48, 3), dtype=np.uint8), ensemble.saved.mean, ensemble.saved.std)
    expected = (single[0].predict(images) + single[1].predict(images)) / 2
    assert np.allclose(ensemble.predict(images), expected, atol=1e-6)
    maps, probabilities = ensemble.explain(images)
    assert maps.shape == (4, 48, 48) and np.allclose(probabilities, expected, atol=1e-6)
    # The ensemble's map is the members' maps of the ensemble's predicted class, averaged, then rescaled to [0, 1].
    predicted = torch.from_numpy(expected.argmax(axis=1))
    member_maps = [member.explain(images, predicted)[0] for member in single]
    assert not np.allclose(member_maps[0], member_maps[1], atol=1e-3)  # two different members, so the average means something
    assert np.allclose(maps, normalise_maps(torch.from_numpy((member_maps[0] + member_maps[1]) / 2)).numpy(), atol=1e-5)
    assert maps.min() >= 0 and maps.max() <= 1


def test_models_of_different_tasks_are_not_averaged(tmp_path):
    first = _save(tmp_path / "a.pt", 1)
    other = _save(tmp_path / "b.pt", 2, classes=["x", "y", "z"])
    with pytest.raises(ModelError, match="same classes and preprocessing"):
        Ensemble.load([first, other])
