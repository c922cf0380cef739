"""Federated temperature scaling of the model a run hands on: the sites score the grid, the server chooses and folds it in."""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from torch import nn

from server.checkpoint import array_record_to_numpy
from shared.calibration import best_temperature, fold_temperature
from shared.config import RoundInstructions, RunConfig
from shared.protocol import CALIBRATE_MESSAGE, INSTRUCTIONS_KEY, NEGATIVE_LOG_LIKELIHOODS_KEY
from shared.weights import load_arrays_into, model_to_arrays

logger = logging.getLogger(__name__)


def calibrate_handed_on_model(grid: Grid, run: RunConfig, arrays: ArrayRecord, model: nn.Module) -> tuple[ArrayRecord, float | None]:
    """The arrays with the temperature that minimises the sites' summed validation likelihood folded in, and that temperature.

    Returns the arrays unchanged and None when no site has validation images or none answered.
    """
    instructions = RoundInstructions.for_round(run, run.federation.rounds)
    config = ConfigRecord({INSTRUCTIONS_KEY: instructions.model_dump_json()})
    messages = [
        Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=node, message_type=CALIBRATE_MESSAGE)
        for node in grid.get_node_ids()
    ]
    replies = list(grid.send_and_receive(messages, timeout=run.federation.round_timeout_s))
    sums = []
    for reply in replies:
        if reply.has_error():
            logger.warning("calibration: node %s did not answer (%s)", reply.metadata.src_node_id, str(reply.error.reason)[:300])
            continue
        metrics = next(iter(reply.content.metric_records.values()))
        if int(metrics["num-examples"]) > 0:
            sums.append(np.asarray(metrics[NEGATIVE_LOG_LIKELIHOODS_KEY], dtype=np.float64))
    if not sums:
        logger.warning("calibration: no site scored validation images; the model keeps its uncalibrated probabilities")
        return arrays, None
    temperature = best_temperature(np.sum(sums, axis=0))
    load_arrays_into(model, array_record_to_numpy(arrays))
    fold_temperature(model, temperature)
    logger.info("skin-fl calibrated the handed-on model: temperature %.3f from %d site(s)", temperature, len(sums))
    return ArrayRecord({name: Array(value) for name, value in model_to_arrays(model).items()}), temperature
