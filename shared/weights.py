"""The named arrays a federated round exchanges: a model's parameters and floating buffers."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from shared.errors import ModelError

_SHOWN_KEYS = 5


def _exchanged_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # Integer buffers (BatchNorm's num_batches_tracked) are counters, not weights: averaging them
    # across sites is meaningless, so they stay local.
    return {name: tensor for name, tensor in model.state_dict().items() if tensor.is_floating_point()}


def model_to_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """Copies of the model's parameters and floating buffers, in state_dict order."""
    return {name: tensor.detach().cpu().numpy().copy() for name, tensor in _exchanged_tensors(model).items()}


def load_arrays_into(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Overwrite the model's parameters and floating buffers in place with `arrays`."""
    targets = _exchanged_tensors(model)
    missing = [name for name in targets if name not in arrays]
    unexpected = [name for name in arrays if name not in targets]
    mismatched = [
        f"{name} {tuple(np.shape(arrays[name]))} vs {tuple(tensor.shape)}"
        for name, tensor in targets.items()
        if name in arrays and tuple(np.shape(arrays[name])) != tuple(tensor.shape)
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing ({', '.join(missing[:_SHOWN_KEYS])})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:_SHOWN_KEYS])})")
        if mismatched:
            problems.append(f"{len(mismatched)} of another shape ({'; '.join(mismatched[:_SHOWN_KEYS])})")
        raise ModelError(
            f"the received weights do not fit this {type(model).__name__}: {', '.join(problems)}; "
            "the sites and the server must use the same model architecture and class list"
        )
    with torch.no_grad():
        for name, tensor in targets.items():
            tensor.copy_(torch.tensor(np.asarray(arrays[name])))
