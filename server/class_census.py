"""The federation's training images per class, summed from the sites' counts, for balance 'global'."""

from __future__ import annotations

import logging
import time

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from shared.config import RoundInstructions, RunConfig
from shared.errors import ConfigError
from shared.protocol import CLASS_COUNTS_KEY, CLASS_COUNTS_MESSAGE, INSTRUCTIONS_KEY

logger = logging.getLogger(__name__)


def take_class_census(grid: Grid, run: RunConfig, server_round: int, min_sites: int) -> list[int]:
    """Ask every connected site for its training images per class (once `min_sites` are connected) and sum them.

    Only counts leave a site. A site that joins later trains with the federation's counts raised
    to at least its own (see shared.class_balance), so a class only it holds is still balanced.
    """
    while len(nodes := sorted(grid.get_node_ids())) < min_sites:
        logger.info("class census: waiting for sites, %d connected (minimum %d)", len(nodes), min_sites)
        time.sleep(1)
    instructions = RoundInstructions.for_round(run, server_round)
    config = ConfigRecord({INSTRUCTIONS_KEY: instructions.model_dump_json()})
    messages = [
        Message(RecordDict({"config": config}), dst_node_id=node, message_type=CLASS_COUNTS_MESSAGE) for node in nodes
    ]
    totals = [0] * len(run.classes)
    answered = 0
    for reply in grid.send_and_receive(messages, timeout=run.federation.round_timeout_s):
        if reply.has_error():
            logger.warning("class census: node %s did not answer (%s)", reply.metadata.src_node_id, str(reply.error.reason)[:300])
            continue
        counts = list(next(iter(reply.content.metric_records.values()))[CLASS_COUNTS_KEY])
        if len(counts) != len(totals) or any(int(count) < 0 for count in counts):
            logger.warning("class census: node %s sent %d counts for %d classes; left out", reply.metadata.src_node_id, len(counts), len(totals))
            continue
        totals = [total + int(count) for total, count in zip(totals, counts)]
        answered += 1
    if answered == 0:
        raise ConfigError(
            "balance 'global' needs the sites' class counts and no site answered the class census; check that the "
            "sites run this version of skin-fl, or set train.balance 'sampler'"
        )
    logger.info(
        "class census: %d site(s), training images per class: %s",
        answered,
        ", ".join(f"{name} {count}" for name, count in zip(run.classes, totals)),
    )
    return totals
