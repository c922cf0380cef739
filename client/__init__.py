"""Flower ClientApp for skin-fl sites and the site-side tools."""

import shared  # noqa: F401,E402 - installs the torchvision shim before any app module imports timm
