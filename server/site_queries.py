"""One question to the sites and their usable answers: the message round behind every server-side query."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from shared.config import RoundInstructions, RunConfig
from shared.protocol import INSTRUCTIONS_KEY

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteAnswer:
    """One site's reply to a query: its node, its metric record, and the whole reply content."""

    node: int
    metrics: MetricRecord
    content: RecordDict


def ask_sites(
    grid: Grid,
    run: RunConfig,
    message_type: str,
    *,
    server_round: int,
    purpose: str,
    arrays: ArrayRecord | None = None,
    nodes: Iterable[int] | None = None,
    federation_class_counts: list[int] | None = None,
) -> list[SiteAnswer]:
    """Send `message_type` with the round's instructions (and `arrays`) to `nodes` (default: every connected site).

    Sites that fail or do not answer in the round timeout are logged under `purpose` and left out.
    """
    instructions = RoundInstructions.for_round(run, server_round, federation_class_counts)
    records = {"config": ConfigRecord({INSTRUCTIONS_KEY: instructions.model_dump_json()})}
    if arrays is not None:
        records["arrays"] = arrays
    targets = sorted(grid.get_node_ids() if nodes is None else nodes)
    messages = [Message(RecordDict(records), dst_node_id=node, message_type=message_type) for node in targets]
    answers = []
    for reply in grid.send_and_receive(messages, timeout=run.federation.round_timeout_s):
        if reply.has_error():
            logger.warning("%s: node %s did not answer (%s)", purpose, reply.metadata.src_node_id, str(reply.error.reason)[:300])
            continue
        metrics = next(iter(reply.content.metric_records.values()))
        answers.append(SiteAnswer(reply.metadata.src_node_id, metrics, reply.content))
    return answers
