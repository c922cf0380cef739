"""ONNX export parity: ONNX Runtime and PyTorch agree on probabilities and on Grad-CAM maps."""

import numpy as np
import pytest
import timm
import torch

from shared.config import ModelConfig, PreprocessConfig
from shared.errors import ModelError
from shared.explain.gradcam import GradCam
from shared.export import OnnxClassifier, export_onnx
from shared.models.classifier import SavedClassifier, build_classifier, model_normalisation

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def _saved(model, name: str, size: int) -> SavedClassifier:
    mean, std = model_normalisation(model)
    return SavedClassifier(model_name=name, classes=CLASSES, preprocess=PreprocessConfig(image_size=size), mean=mean, std=std)


@pytest.mark.slow  # exports and runs full-size models in ONNX Runtime (10-30 s each on a loaded 2-core machine)
@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18"])
def test_onnx_runtime_matches_pytorch_probabilities_and_gradcam(tmp_path, name):
    torch.manual_seed(0)
    model = build_classifier(ModelConfig(name=name, pretrained="none"), num_classes=len(CLASSES)).eval()
    with torch.no_grad():  # a non-trivial head, so the classes' maps differ
        model.get_classifier().weight.normal_(0, 0.5)
    path = export_onnx(model, _saved(model, name, 64), tmp_path / "model.onnx")
    exported = OnnxClassifier.load(path, threads=1)
    assert exported.classes == CLASSES and exported.saved.preprocess.image_size == 64

    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = model(images).softmax(dim=1).numpy()
    assert np.allclose(exported.predict(images), expected, atol=1e-4)

    with GradCam(model) as cam:
        torch_maps, torch_probabilities = cam(images)
        second_class_maps, _ = cam(images, class_indices=torch.tensor([1, 2, 3]))
    onnx_maps, onnx_probabilities = exported.explain(images)
    assert np.allclose(onnx_probabilities, torch_probabilities, atol=1e-4)
    assert np.allclose(onnx_maps, torch_maps, atol=1e-3)
    onnx_second, _ = exported.explain(images, class_indices=[1, 2, 3])
    assert np.allclose(onnx_second, second_class_maps, atol=1e-3)


def test_heads_that_are_not_pooled_linear_are_refused_for_maps(tmp_path):
    model = timm.create_model("test_convnext", pretrained=False, num_classes=3).eval()
    mean, std = model_normalisation(model)
    saved = SavedClassifier(model_name="test_convnext", classes=["a", "b", "c"], preprocess=PreprocessConfig(image_size=64), mean=mean, std=std)
    with pytest.raises(ModelError, match="not global average pooling plus one linear layer|not one linear layer"):
        export_onnx(model, saved, tmp_path / "model.onnx")


def test_a_foreign_onnx_file_is_refused(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(ModelError, match="not a readable ONNX model"):
        OnnxClassifier.load(bad)
