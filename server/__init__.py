"""Flower ServerApp for skin-fl: strategies with checkpoints and history, and the coordinator's tools."""

import shared  # noqa: F401,E402 - installs the torchvision shim before any app module imports timm
