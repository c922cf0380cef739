"""Tests of the arrays exchanged in federated rounds: what is sent, loading them back, mismatches."""

import numpy as np
import pytest
import torch

from shared.config import ModelConfig
from shared.errors import ModelError
from shared.models.classifier import build_classifier
from shared.weights import load_arrays_into, model_to_arrays


def _model(num_classes: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return build_classifier(ModelConfig(name="test_efficientnet", pretrained="none"), num_classes)


def test_arrays_are_parameters_and_floating_buffers_in_state_dict_order():
    model = _model()
    arrays = model_to_arrays(model)

    expected = [name for name, tensor in model.state_dict().items() if tensor.is_floating_point()]
    assert list(arrays) == expected
    assert any(name.endswith("running_var") for name in arrays)
    assert not any(name.endswith("num_batches_tracked") for name in arrays)
    assert all(isinstance(array, np.ndarray) for array in arrays.values())


def test_arrays_are_copies_not_views_of_the_model():
    model = _model()
    arrays = model_to_arrays(model)
    first = next(iter(arrays))
    before = arrays[first].copy()
    with torch.no_grad():
        model.state_dict()[first].add_(1.0)
    np.testing.assert_array_equal(arrays[first], before)


def test_round_trip_into_another_model_of_the_same_architecture():
    source, target = _model(seed=1), _model(seed=2)
    with torch.no_grad():
        next(module for module in source.modules() if isinstance(module, torch.nn.BatchNorm2d)).running_mean.fill_(0.25)
    arrays = {name: array.astype(np.float64) for name, array in model_to_arrays(source).items()}

    load_arrays_into(target, arrays)

    for name, tensor in target.state_dict().items():
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float32
            assert torch.equal(tensor, source.state_dict()[name]), name
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(source.eval()(images), target.eval()(images))


def test_mismatched_arrays_name_the_keys_and_the_fix():
    arrays = model_to_arrays(_model(num_classes=4))
    with pytest.raises(ModelError, match=r"2 of another shape \(classifier\.weight \(4, .*same model architecture and class list"):
        load_arrays_into(_model(num_classes=3), arrays)

    arrays = model_to_arrays(_model())
    arrays.pop("conv_stem.weight")
    arrays["extra.weight"] = np.zeros(2, dtype=np.float32)
    with pytest.raises(ModelError, match=r"1 missing \(conv_stem\.weight\), 1 unexpected \(extra\.weight\)"):
        load_arrays_into(_model(), arrays)
