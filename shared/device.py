"""Which torch device to train on, its default image size, and the CPU thread count."""

from __future__ import annotations

import os

import torch

from shared.errors import ConfigError

CPU_IMAGE_SIZE = 128
ACCELERATOR_IMAGE_SIZE = 224


def resolve_device(name: str = "auto") -> torch.device:
    """The device named by `name`: auto picks CUDA, then Apple MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise ConfigError("device 'mps' was asked for but Apple MPS is not available here; use --device cpu or auto")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {name!r} was asked for but torch sees no CUDA GPU (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu or auto, or install the CUDA "
                "build of torch and the NVIDIA driver"
            )
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r} was asked for but only {torch.cuda.device_count()} CUDA GPU(s) are visible; "
                f"use cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
        return device
    raise ConfigError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N, mps")


def _mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def default_image_size(device: torch.device) -> int:
    """Training image side: 128 px on the CPU (affordable), 224 px on an accelerator."""
    return CPU_IMAGE_SIZE if torch.device(device).type == "cpu" else ACCELERATOR_IMAGE_SIZE


def usable_cpu_count() -> int:
    """CPUs this process may run on (a container's or a job's share, not the whole machine)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def cpu_threads_per_process(processes_sharing: int) -> int:
    """Torch threads for each of `processes_sharing` training processes on this machine: its CPUs shared out, at least 1.

    Each process running torch with every core's threads would oversubscribe the machine
    (two sites' rounds on two cores ran 15x slower than one site alone).
    """
    if processes_sharing < 1:
        raise ConfigError(f"{processes_sharing} processes cannot share the CPUs; give at least 1")
    return max(1, usable_cpu_count() // processes_sharing)


def configure_cpu_threads(num_threads: int | None) -> None:
    """Limit torch's intra-op CPU threads (sites sharing one machine); None leaves torch's default."""
    if num_threads is None:
        return
    if num_threads < 1:
        raise ConfigError(f"CPU thread count {num_threads} must be at least 1; give a positive number or leave it unset")
    torch.set_num_threads(int(num_threads))
