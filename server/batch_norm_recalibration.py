"""BatchNorm recalibration of a round's aggregated model: the sites measure its statistics, the server merges them."""

from __future__ import annotations

import logging

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from server.checkpoint import array_record_to_numpy
from shared.batch_norm import merge_batch_norm_statistics
from shared.config import RoundInstructions, RunConfig
from shared.protocol import BATCH_NORM_MESSAGE, INSTRUCTIONS_KEY

logger = logging.getLogger(__name__)


def recalibrate_batch_norm(grid: Grid, run: RunConfig, arrays: ArrayRecord, nodes: list[int], server_round: int) -> ArrayRecord:
    """`arrays` with every BatchNorm layer's statistics measured at the given sites on this model and merged.

    Sites that do not answer are left out; with no answer at all the averaged statistics stay.
    """
    instructions = RoundInstructions.for_round(run, server_round)
    config = ConfigRecord({INSTRUCTIONS_KEY: instructions.model_dump_json()})
    messages = [
        Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=node, message_type=BATCH_NORM_MESSAGE)
        for node in sorted(nodes)
    ]
    measured, counts = [], []
    for reply in grid.send_and_receive(messages, timeout=run.federation.round_timeout_s):
        if reply.has_error():
            logger.warning("BatchNorm recalibration: node %s did not answer (%s)", reply.metadata.src_node_id, str(reply.error.reason)[:300])
            continue
        metrics = next(iter(reply.content.metric_records.values()))
        measured.append(array_record_to_numpy(reply.content["statistics"]))
        counts.append(int(metrics["num-examples"]))
    if not measured:
        logger.warning("BatchNorm recalibration of round %d: no site answered; the averaged statistics stay", server_round)
        return arrays
    updated = array_record_to_numpy(arrays)
    updated.update(merge_batch_norm_statistics(measured, counts))
    return ArrayRecord({name: Array(value) for name, value in updated.items()})
