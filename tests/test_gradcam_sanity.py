"""Model-randomisation sanity check of Grad-CAM (Adebayo et al. 2018): maps must depend on the learned top layers."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from demo_model_support import shared_demo_model
from shared.config import ModelConfig
from shared.data.transforms import build_eval_transform
from shared.explain.gradcam import GradCam
from shared.models.classifier import build_classifier, load_classifier

pytestmark = pytest.mark.slow

TOP_LAYERS = ("classifier", "bn2", "conv_head", "blocks.6")
"""tf_efficientnet_lite0's layers from the output down, randomised cumulatively (cascading randomisation)."""


def _test_batch(demo, saved) -> torch.Tensor:
    test = demo.images.select("test")
    transform = build_eval_transform(saved.mean, saved.std)
    return torch.stack([transform(torch.from_numpy(np.array(pixels)).permute(2, 0, 1)) for pixels in test.images])


def _maps(model, images, method, classes):
    with GradCam(model, method=method) as cam:
        maps, _ = cam(images, class_indices=classes)
    return maps


def _mean_rank_correlation(first: np.ndarray, second: np.ndarray) -> float:
    values = []
    for a, b in zip(first, second):
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            values.append(0.0)  # a flat map shares no ranking with anything
            continue
        values.append(spearmanr(a.ravel(), b.ravel()).statistic)
    return float(np.mean(values))


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_randomising_the_top_layers_changes_the_maps(method):
    demo = shared_demo_model()
    model, saved = load_classifier(demo.model_path)
    images = _test_batch(demo, saved)
    with torch.no_grad():
        explained_classes = model(images).argmax(dim=1)
    trained_maps = _maps(model, images, method, explained_classes)
    # The measure itself: the same model gives the same maps (rank correlation 1).
    assert _mean_rank_correlation(trained_maps, _maps(model, images, method, explained_classes)) > 0.999
    assert (np.ptp(trained_maps, axis=(1, 2)) > 0).mean() > 0.8, "trained maps should not be flat"

    torch.manual_seed(1234)
    random_model = build_classifier(ModelConfig(name=saved.model_name, pretrained="none"), num_classes=len(saved.classes))
    correlations = []
    for depth in range(1, len(TOP_LAYERS) + 1):
        for name in TOP_LAYERS[:depth]:
            model.get_submodule(name).load_state_dict(random_model.get_submodule(name).state_dict())
        model.eval()
        correlations.append(_mean_rank_correlation(trained_maps, _maps(model, images, method, explained_classes)))
    report = f"{method} rank correlations after randomising {TOP_LAYERS} cumulatively: {correlations}"
    # Adebayo et al.: a method that ignores the weights keeps correlations near 1. Measured on the demo model
    # (its classification layer trained from zero): Grad-CAM 0.13, 0.20, 0.53, -0.17; Grad-CAM++ 0.98, 0.89,
    # 0.78, 0.58 (below 0.5 while the layer started from timm's random draw).
    assert correlations[-1] < (0.5 if method == "gradcam" else 0.65), report
    if method == "gradcam":
        # Grad-CAM's channel weights are the head's weights, so randomising the head alone changes the maps.
        assert max(correlations) < 0.6, report
    else:
        # Grad-CAM++'s alphas turn a linear head's weights into near sign indicators, so its maps hold
        # until the last convolution is randomised too; from there they must change, and keep changing.
        assert max(correlations[2:]) < 0.85 and correlations[-1] < correlations[2], report
