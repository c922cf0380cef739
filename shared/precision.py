"""Mixed-precision policy: which autocast dtype and whether a GradScaler, per device and privacy setting."""

from __future__ import annotations

import copy
import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shared.errors import ConfigError

AMP_MODES = ("auto", "on", "off")
BF16_MIN_SPEEDUP = 0.10
"""On the CPU, auto mode picks bf16 only when a measured step is at least this much faster."""

_TIMED_STEPS = 2
_PROBE_BATCH = 8
_WARMUP_GIVE_UP = 3.0
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
_cpu_decisions: dict[tuple, Precision] = {}


@dataclass(frozen=True)
class Precision:
    """How training and inference run: autocast dtype (None = fp32) and whether a GradScaler is used."""

    autocast_dtype: torch.dtype | None
    use_grad_scaler: bool
    device_type: str

    def __post_init__(self) -> None:
        # fp16 matrix kernels on the CPU are emulated and about 18x slower than fp32.
        if self.device_type == "cpu" and self.autocast_dtype == torch.float16:
            raise ConfigError("fp16 autocast on the CPU is far slower than fp32; use bf16 or fp32 (--amp off)")

    @property
    def name(self) -> str:
        """Short label for logs and reports: fp32, bf16, fp16+scaler."""
        if self.autocast_dtype is None:
            return "fp32"
        label = _DTYPE_NAMES.get(self.autocast_dtype, str(self.autocast_dtype).removeprefix("torch."))
        return f"{label}+scaler" if self.use_grad_scaler else label

    def autocast(self) -> AbstractContextManager:
        """The context manager to run forward passes in (a no-op for fp32)."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype)


def resolve_precision(
    mode: str,
    device: torch.device | str,
    *,
    model: nn.Module | None = None,
    sample_shape: tuple[int, ...] | None = None,
    batch_size: int = 16,
    private: bool = False,
) -> Precision:
    """The precision for `mode` (auto/on/off) on `device`.

    CUDA: fp16 with a GradScaler, or bf16 without one when training is private (a GradScaler
    under DP-SGD would clip the scaled per-sample gradients). CPU: bf16 when asked for; in
    auto mode bf16 only when it measures faster for this model and input, else fp32. Never
    fp16 on the CPU.
    """
    if mode not in AMP_MODES:
        raise ConfigError(f"mixed-precision mode {mode!r} is not one of {list(AMP_MODES)}")
    device = torch.device(device)
    fp32 = Precision(None, False, device.type)
    if mode == "off":
        return fp32
    if device.type == "cuda":
        if private:
            return Precision(torch.bfloat16, False, "cuda") if _cuda_supports_bf16(device) else fp32
        return Precision(torch.float16, True, "cuda")
    if device.type == "cpu":
        if mode == "on":
            return Precision(torch.bfloat16, False, "cpu")
        if model is None or sample_shape is None or not cpu_has_native_bf16():
            return fp32
        return _measured_cpu_precision(model, tuple(sample_shape), batch_size)
    if mode == "on":
        raise ConfigError(f"mixed precision is supported on cuda and cpu, not {device.type}; use --amp auto or off")
    return fp32


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX).

    Without them bf16 autocast is emulated: measured here on an AVX2 EPYC it ran
    tf_efficientnet_lite0 two to four times slower than fp32, with some steps taking minutes,
    so auto mode does not even probe it there.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in (" avx512_bf16", " amx_bf16"))


def _cuda_supports_bf16(device: torch.device) -> bool:
    if not torch.cuda.is_available():
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def _measured_cpu_precision(model: nn.Module, sample_shape: tuple[int, ...], batch_size: int) -> Precision:
    parameter_count = sum(parameter.numel() for parameter in model.parameters())
    key = (type(model).__name__, parameter_count, sample_shape, batch_size, torch.get_num_threads())
    if key not in _cpu_decisions:
        fp32 = Precision(None, False, "cpu")
        bf16 = Precision(torch.bfloat16, False, "cpu")
        # A copy keeps the real model's weights, gradients and BatchNorm statistics untouched;
        # fork_rng keeps the caller's random stream (dropout, inputs) as if nothing had run.
        # bf16 speed relative to fp32 depends on the CPU's bf16 instructions far more than on
        # the batch size, so a small probe batch decides it at a fraction of the cost.
        with torch.random.fork_rng(devices=[]):
            probe = copy.deepcopy(model).to("cpu").train()
            inputs = torch.randn(min(max(batch_size, 2), _PROBE_BATCH), *sample_shape)
            fp32_warmup, fp32_seconds = _step_seconds(probe, inputs, fp32)
            # Where bf16 is emulated its first step alone costs many fp32 steps: stop there.
            _, bf16_seconds = _step_seconds(
                probe, inputs, bf16, give_up_after=(_WARMUP_GIVE_UP * fp32_warmup, 2 * fp32_seconds)
            )
        _cpu_decisions[key] = bf16 if bf16_seconds <= (1 - BF16_MIN_SPEEDUP) * fp32_seconds else fp32
    return _cpu_decisions[key]


def _step_seconds(
    model: nn.Module,
    inputs: torch.Tensor,
    precision: Precision,
    give_up_after: tuple[float, float] = (math.inf, math.inf),
) -> tuple[float, float]:
    """Seconds of a warm-up step and of the fastest of a few timed forward+backward steps.

    Stops early (fastest = inf when no timed step ran) once the warm-up step or a timed step
    takes longer than the matching entry of `give_up_after`.
    """
    warmup_seconds, fastest = math.inf, math.inf
    for step in range(1 + _TIMED_STEPS):
        started = time.perf_counter()
        model.zero_grad(set_to_none=True)
        with precision.autocast():
            outputs = model(inputs)
        outputs.float().mean().backward()
        seconds = time.perf_counter() - started
        if step == 0:
            warmup_seconds = seconds
            if seconds > give_up_after[0]:
                break
        else:
            fastest = min(fastest, seconds)
            if seconds > give_up_after[1]:
                break
    return warmup_seconds, fastest
