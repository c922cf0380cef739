"""Federated class-prior correction of the model a run hands on: the sites sum their soft confusion, the server steps the offsets."""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp import Grid
from torch import nn

from server.checkpoint import array_record_to_numpy
from server.site_queries import ask_sites
from shared.config import RunConfig
from shared.prior_correction import PRIOR_STEPS, fold_offsets, offset_step
from shared.protocol import PRIOR_MESSAGE, SOFT_CONFUSION_KEY
from shared.weights import load_arrays_into, model_to_arrays

logger = logging.getLogger(__name__)


def _with_offsets(model: nn.Module, arrays: dict, offsets: np.ndarray) -> ArrayRecord:
    load_arrays_into(model, arrays)
    fold_offsets(model, offsets)
    return ArrayRecord({name: Array(value) for name, value in model_to_arrays(model).items()})


def correct_class_prior(grid: Grid, run: RunConfig, arrays: ArrayRecord, model: nn.Module) -> tuple[ArrayRecord, list[float] | None]:
    """The arrays with per-class logit offsets folded in that balance the sites' validation predictions, and the offsets.

    Every step sends the model with the current offsets; the sites reply with their summed
    validation probabilities per true class, and the server's step (shared.prior_correction)
    moves the offsets. Returns the arrays unchanged and None when no site has validation images.
    """
    base = array_record_to_numpy(arrays)
    num_classes = len(run.classes)
    offsets = np.zeros(num_classes)
    for step in range(PRIOR_STEPS):
        answers = ask_sites(
            grid, run, PRIOR_MESSAGE, server_round=run.federation.rounds, purpose="prior correction",
            arrays=_with_offsets(model, base, offsets),
        )
        summed, sites = np.zeros((num_classes, num_classes)), 0
        for answer in answers:
            values = np.asarray(answer.metrics[SOFT_CONFUSION_KEY], dtype=np.float64)
            if values.size != num_classes**2:
                logger.warning("prior correction: node %s sent %d numbers for %d classes; left out", answer.node, values.size, num_classes)
                continue
            summed += values.reshape(num_classes, num_classes)
            sites += 1
        if summed.sum() == 0:
            logger.warning("prior correction: no site scored validation images at step %d; the model keeps its class prior", step + 1)
            return arrays, None
        offsets = offset_step(summed, offsets)
    logger.info(
        "skin-fl balanced the handed-on model's class prior (logit offsets %s, %d site(s))",
        ", ".join(f"{name} {value:+.2f}" for name, value in zip(run.classes, offsets)),
        sites,
    )
    return _with_offsets(model, base, offsets), [float(value) for value in offsets]
