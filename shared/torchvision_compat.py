"""Lets torchvision's pure-Python parts (and so timm) import beside a CPU-only torch build."""

import importlib.util
from pathlib import Path

import torch

_DETECTION_OP_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_registered_library = None


def ensure_torchvision_importable() -> None:
    """Define torchvision's detection-op schemas when its compiled ops failed to load.

    The torchvision wheel that matches torch 2.13 on PyPI is a CUDA build; beside a CPU
    torch its C++ ops do not register and `import torchvision` fails on `torchvision::nms`.
    skin-fl uses none of those ops, so declaring their schemas is enough.
    """
    global _registered_library
    if _registered_library is not None or _torchvision_ops_loaded():
        return
    library = torch.library.Library("torchvision", "DEF")
    for schema in _DETECTION_OP_SCHEMAS:
        library.define(schema)
    _registered_library = library


def _nms_registered() -> bool:
    try:
        torch.ops.torchvision.nms  # noqa: B018 - attribute access is the probe
    except (AttributeError, RuntimeError):
        return False
    return True


def _torchvision_ops_loaded() -> bool:
    """Whether torchvision's compiled ops are (or can be) registered with this torch.

    A torchvision build that matches the installed torch (a CUDA machine's) registers them
    itself; declaring the schemas first would make its own registration abort the process.
    """
    if _nms_registered():
        return True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    for library in sorted(Path(spec.origin).parent.glob("_C*.so")) + sorted(Path(spec.origin).parent.glob("_C*.pyd")):
        try:
            torch.ops.load_library(str(library))
        except (OSError, RuntimeError):
            return False
        return _nms_registered()
    return False
