"""Test-wide settings: quiet Flower, deterministic torch, the real-data path setting."""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import shared  # noqa: E402,F401 - installs the torchvision shim before any test imports timm
