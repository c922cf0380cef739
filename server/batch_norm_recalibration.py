"""BatchNorm recalibration of a round's aggregated model: the sites measure its statistics, the server merges them."""

from __future__ import annotations

import logging

from flwr.app import Array, ArrayRecord
from flwr.serverapp import Grid

from server.checkpoint import array_record_to_numpy
from server.site_queries import ask_sites
from shared.batch_norm import merge_batch_norm_statistics
from shared.config import RunConfig
from shared.protocol import BATCH_NORM_MESSAGE

logger = logging.getLogger(__name__)


def recalibrate_batch_norm(grid: Grid, run: RunConfig, arrays: ArrayRecord, nodes: list[int], server_round: int) -> ArrayRecord:
    """`arrays` with every BatchNorm layer's statistics measured at the given sites on this model and merged.

    Sites that do not answer are left out; with no answer at all the averaged statistics stay.
    """
    measured, counts = [], []
    answers = ask_sites(
        grid, run, BATCH_NORM_MESSAGE, server_round=server_round, purpose="BatchNorm recalibration", arrays=arrays, nodes=nodes
    )
    for answer in answers:
        measured.append(array_record_to_numpy(answer.content["statistics"]))
        counts.append(int(answer.metrics["num-examples"]))
    if not measured:
        logger.warning("BatchNorm recalibration of round %d: no site answered; the averaged statistics stay", server_round)
        return arrays
    updated = array_record_to_numpy(arrays)
    updated.update(merge_batch_norm_statistics(measured, counts))
    return ArrayRecord({name: Array(value) for name, value in updated.items()})
