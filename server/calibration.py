"""Federated temperature scaling of the model a run hands on: the sites score the grid, the server chooses and folds it in."""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp import Grid
from torch import nn

from server.checkpoint import array_record_to_numpy
from server.site_queries import ask_sites
from shared.calibration import best_temperature, fold_temperature
from shared.config import RunConfig
from shared.protocol import CALIBRATE_MESSAGE, NEGATIVE_LOG_LIKELIHOODS_KEY
from shared.weights import load_arrays_into, model_to_arrays

logger = logging.getLogger(__name__)


def calibrate_handed_on_model(grid: Grid, run: RunConfig, arrays: ArrayRecord, model: nn.Module) -> tuple[ArrayRecord, float | None]:
    """The arrays with the temperature that minimises the sites' summed validation likelihood folded in, and that temperature.

    Returns the arrays unchanged and None when no site has validation images or none answered.
    """
    sums = [
        np.asarray(answer.metrics[NEGATIVE_LOG_LIKELIHOODS_KEY], dtype=np.float64)
        for answer in ask_sites(grid, run, CALIBRATE_MESSAGE, server_round=run.federation.rounds, purpose="calibration", arrays=arrays)
        if int(answer.metrics["num-examples"]) > 0
    ]
    if not sums:
        logger.warning("calibration: no site scored validation images; the model keeps its uncalibrated probabilities")
        return arrays, None
    temperature = best_temperature(np.sum(sums, axis=0))
    load_arrays_into(model, array_record_to_numpy(arrays))
    fold_temperature(model, temperature)
    logger.info("skin-fl calibrated the handed-on model: temperature %.3f from %d site(s)", temperature, len(sums))
    return ArrayRecord({name: Array(value) for name, value in model_to_arrays(model).items()}), temperature
