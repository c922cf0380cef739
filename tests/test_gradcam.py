"""Tests of Grad-CAM / Grad-CAM++: target-layer resolution, batched maps, localisation, hooks, overlays."""

import numpy as np
import pytest
import timm
import torch
from torch import nn

from shared.errors import ModelError
from shared.explain.gradcam import GradCam, find_target_layer, jet_colours, overlay_heatmap
from shared.training import place_model


def _colour_detector() -> nn.Module:
    """Class 0 = mean redness, class 1 = mean greenness: its maps must sit on the red / green patches."""
    conv = nn.Conv2d(3, 2, kernel_size=1, bias=False)
    head = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0] = 1.0
        conv.weight[1, 1] = 1.0
        head.weight.copy_(torch.eye(2))
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


@pytest.mark.parametrize(
    "name, expected",
    [("tf_efficientnet_lite0", "bn2"), ("resnet18", "layer4"), ("mobilenetv3_small_050", "blocks"), ("test_convnext", "norm_pre")],
)
def test_target_layer_is_the_last_spatial_feature_layer(name, expected):
    model = timm.create_model(name, pretrained=False, num_classes=3)
    assert find_target_layer(model) == expected


def test_transformers_are_refused_with_the_fix():
    model = timm.create_model("test_vit", pretrained=False, num_classes=3)
    with pytest.raises(ModelError, match="no layer with a spatial feature map.*convolutional timm model"):
        GradCam(model)


def test_unknown_layer_name_suggests_close_names():
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    with pytest.raises(ModelError, match="no layer named 'layer5'.*did you mean"):
        GradCam(model, target_layer="layer5")


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_maps_sit_on_the_evidence_for_the_explained_class(method):
    image = torch.zeros(1, 3, 32, 32)
    image[0, 0, 2:10, 2:10] = 1.0  # red patch, top left
    image[0, 1, 20:30, 20:30] = 1.0  # green patch, bottom right (larger, so predicted)
    with GradCam(_colour_detector(), method=method) as cam:
        predicted_maps, probabilities = cam(image)
        red_maps, _ = cam(image, class_indices=torch.tensor([0]))
    assert probabilities.argmax(axis=1).tolist() == [1]
    assert predicted_maps[0, 25, 25] == pytest.approx(1.0) and predicted_maps[0, 5, 5] < 0.1
    assert red_maps[0, 5, 5] == pytest.approx(1.0) and red_maps[0, 25, 25] < 0.1


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_batched_maps_match_single_image_maps_on_a_channels_last_timm_model(method):
    torch.manual_seed(0)
    model = place_model(timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=4), torch.device("cpu"))
    images = torch.randn(5, 3, 64, 64)
    with GradCam(model, method=method, batch_size=2) as cam:
        maps, probabilities = cam(images)
        single, _ = cam(images[3:4])
    assert maps.shape == (5, 64, 64) and maps.dtype == np.float32
    assert probabilities.shape == (5, 4) and probabilities.dtype == np.float32
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert maps.min() >= 0.0 and maps.max() <= 1.0 and np.isclose(maps.max(axis=(1, 2)), 1.0).all()
    assert np.allclose(maps[3], single[0], atol=1e-4)


def test_hooks_are_removed_and_training_mode_restored():
    model = timm.create_model("resnet18", pretrained=False, num_classes=3).train()
    with GradCam(model) as cam:
        assert len(model.layer4._forward_hooks) == 1
        cam(torch.randn(2, 3, 64, 64))
        assert model.training
    assert len(model.layer4._forward_hooks) == 0
    with pytest.raises(ModelError, match="closed"):
        cam(torch.randn(1, 3, 64, 64))


def test_frozen_weights_still_give_maps():
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with GradCam(model) as cam:
        maps, _ = cam(torch.randn(1, 3, 64, 64))
    assert maps.max() == pytest.approx(1.0)


def test_wrong_class_index_count_is_refused():
    with GradCam(_colour_detector()) as cam, pytest.raises(ModelError, match="2 class indices for 1 images"):
        cam(torch.zeros(1, 3, 8, 8), class_indices=torch.tensor([0, 1]))


def test_overlay_resizes_the_heatmap_and_colours_hot_spots_red():
    rgb = np.full((40, 60, 3), 128, dtype=np.uint8)
    heatmap = np.zeros((4, 6), dtype=np.float32)
    heatmap[0, 0] = 1.0
    overlay = overlay_heatmap(rgb, heatmap, alpha=0.5)
    assert overlay.shape == (40, 60, 3) and overlay.dtype == np.uint8
    hot, cold = overlay[1, 1].astype(int), overlay[-1, -1].astype(int)
    assert hot[0] > hot[2] and cold[2] > cold[0]
    assert np.array_equal(overlay_heatmap(rgb, heatmap, alpha=0.0), rgb)
    assert jet_colours(np.array([0.0, 1.0])).tolist() == [[0, 0, 128], [128, 0, 0]]
    with pytest.raises(ValueError, match="alpha"):
        overlay_heatmap(rgb, heatmap, alpha=2.0)
