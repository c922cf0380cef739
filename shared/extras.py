"""The optional parts of skin-fl (pip extras): check that one is installed, or say how to install it."""

from __future__ import annotations

import importlib.util

from shared.errors import SkinFLError

# The top-level modules each extra of pyproject.toml brings (tests/test_packaging.py checks them).
EXTRA_MODULES = {
    "web": ("fastapi", "starlette", "uvicorn", "multipart"),
    "onnx": ("onnx", "onnxruntime"),
    "simulation": ("ray",),
    "tracking": ("tensorboardX",),
}


def require_extra(extra: str, purpose: str) -> None:
    """Raise a SkinFLError naming the pip command when a module of `extra` is not installed."""
    missing = [module for module in EXTRA_MODULES[extra] if importlib.util.find_spec(module) is None]
    if missing:
        raise SkinFLError(
            f"{purpose} needs the '{extra}' extra ({', '.join(missing)} not installed): "
            f"pip install -c constraints.txt -e '.[{extra}]' in a clone of skin-fl, or pip install 'skin-fl[{extra}]'"
        )
