"""End-of-run report request: sites write their local reports and reply with aggregate metrics only."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from server.aggregate_report import write_aggregate_report
from server.strategy import site_name_of
from shared.config import RoundInstructions, RunConfig
from shared.protocol import FINAL_REPORT_KEY, INSTRUCTIONS_KEY

REPORT_FOLDER = "report"
logger = logging.getLogger(__name__)


def request_site_reports(grid: Grid, run: RunConfig, final_arrays: ArrayRecord, run_folder: Path) -> dict | None:
    """Send the final model to every site for its local report; write the aggregate-only report to `run_folder/report`.

    Returns the coordinator's report, or None when no site answered.
    """
    instructions = RoundInstructions.for_round(run, run.federation.rounds)
    config = ConfigRecord({INSTRUCTIONS_KEY: instructions.model_dump_json(), FINAL_REPORT_KEY: True})
    messages = [
        Message(
            RecordDict({"arrays": final_arrays, "config": config}),
            dst_node_id=node_id,
            message_type=MessageType.EVALUATE,
        )
        for node_id in grid.get_node_ids()
    ]
    replies = list(grid.send_and_receive(messages, timeout=run.federation.round_timeout_s))
    per_site, failed = {}, []
    for reply in replies:
        if reply.has_error():
            failed.append({"node": int(reply.metadata.src_node_id), "error": str(reply.error.reason)[:500]})
            continue
        per_site[site_name_of(reply)] = dict(next(iter(reply.content.metric_records.values())))
    if failed:
        logger.warning("%d site(s) could not write their final report: %s", len(failed), failed)
    if not per_site:
        return None
    return write_aggregate_report(
        Path(run_folder) / REPORT_FOLDER, per_site, run.classes, title="All sites", extra={"failed_sites": failed}
    )
