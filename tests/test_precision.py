"""Tests of the mixed-precision policy per device, privacy setting and measured CPU speed."""

from contextlib import nullcontext

import pytest
import torch

from shared import precision as precision_module
from shared.config import ModelConfig
from shared.errors import ConfigError
from shared.models.classifier import build_classifier
from shared.precision import Precision, resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _plain_conv_model():
    # No depthwise convolutions: their emulated bf16 backward takes many seconds on CPUs without bf16 units.
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3)
    )


def _tiny_model():
    return build_classifier(ModelConfig(name="test_efficientnet", pretrained="none"), num_classes=3)


def test_off_is_fp32_everywhere():
    for device in (CPU, CUDA):
        precision = resolve_precision("off", device, model=_tiny_model(), sample_shape=(3, 32, 32))
        assert precision == Precision(None, False, device.type)
        assert precision.name == "fp32"
        assert isinstance(precision.autocast(), nullcontext)


def test_on_is_bf16_on_the_cpu_and_autocasts_to_it():
    precision = resolve_precision("on", CPU)
    assert (precision.autocast_dtype, precision.use_grad_scaler, precision.name) == (torch.bfloat16, False, "bf16")
    with precision.autocast():
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert product.dtype == torch.bfloat16


def test_cuda_uses_fp16_with_a_grad_scaler():
    for mode in ("auto", "on"):
        precision = resolve_precision(mode, CUDA)
        assert (precision.autocast_dtype, precision.use_grad_scaler, precision.name) == (torch.float16, True, "fp16+scaler")


def test_never_fp16_on_the_cpu():
    model = _tiny_model()
    for mode in ("auto", "on", "off"):
        for private in (False, True):
            chosen = resolve_precision(mode, CPU, model=model, sample_shape=(3, 32, 32), batch_size=4, private=private)
            assert chosen.autocast_dtype != torch.float16
    with pytest.raises(ConfigError, match="fp16 autocast on the CPU"):
        Precision(torch.float16, True, "cpu")


def test_private_training_never_uses_a_grad_scaler():
    for device in (CPU, CUDA):
        for mode in ("auto", "on", "off"):
            precision = resolve_precision(mode, device, private=True)
            assert not precision.use_grad_scaler
            assert precision.autocast_dtype != torch.float16


def test_auto_on_a_cpu_without_native_bf16_is_fp32_without_measuring(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)
    decisions_before = dict(precision_module._cpu_decisions)
    chosen = resolve_precision("auto", CPU, model=_tiny_model(), sample_shape=(3, 40, 40), batch_size=4)
    assert chosen.name == "fp32"
    assert precision_module._cpu_decisions == decisions_before


def test_auto_on_the_cpu_measures_once_and_leaves_the_model_and_random_stream_alone(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)
    model = _plain_conv_model()
    key = ("Sequential", sum(p.numel() for p in model.parameters()), (3, 40, 40), 4, torch.get_num_threads())
    assert key not in precision_module._cpu_decisions
    state_before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    torch.manual_seed(3)
    expected_next_random = torch.rand(3)
    torch.manual_seed(3)

    chosen = resolve_precision("auto", CPU, model=model, sample_shape=(3, 40, 40), batch_size=4)

    assert torch.equal(torch.rand(3), expected_next_random)
    assert chosen.name in ("fp32", "bf16")
    assert all(torch.equal(tensor, state_before[name]) for name, tensor in model.state_dict().items())
    assert all(parameter.grad is None for parameter in model.parameters())
    assert precision_module._cpu_decisions[key] is chosen
    assert resolve_precision("auto", CPU, model=_plain_conv_model(), sample_shape=(3, 40, 40), batch_size=4) is chosen


def test_auto_on_the_cpu_without_a_model_is_fp32():
    assert resolve_precision("auto", CPU).name == "fp32"


def test_unknown_mode_and_unsupported_device_are_errors():
    with pytest.raises(ConfigError, match=r"mixed-precision mode 'fast' is not one of \['auto', 'on', 'off'\]"):
        resolve_precision("fast", CPU)
    with pytest.raises(ConfigError, match="not mps; use --amp auto or off"):
        resolve_precision("on", torch.device("mps"))
