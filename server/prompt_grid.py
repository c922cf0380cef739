"""The coordinator's grid with a short reply check: Flower's deployment grid sleeps a fixed 3 s between checks."""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

PULL_INTERVAL_S = 0.25
"""Seconds between checks for the sites' replies: each phase of a round ends at most this long after the last reply."""


class PromptGrid(Grid):
    """Flower's grid, whose `send_and_receive` checks for replies every `pull_interval_s` seconds.

    Flower's deployment grid checks every 3 s, so every phase of every round (train, evaluate,
    each query) waits 1.5 s on average after its last reply; its in-memory simulation grid checks
    every 0.1 s. Everything else is passed to the wrapped grid unchanged.
    """

    def __init__(self, grid: Grid, pull_interval_s: float = PULL_INTERVAL_S) -> None:
        if pull_interval_s <= 0:
            raise ValueError(f"pull interval {pull_interval_s} s must be positive")
        self.grid = grid
        self.pull_interval_s = pull_interval_s

    def set_run(self, run) -> None:
        """Set the run the wrapped grid operates in."""
        self.grid.set_run(run)

    @property
    def run(self):
        """The wrapped grid's run."""
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        """A message from the wrapped grid."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """The connected sites' node ids."""
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Send `messages`; their ids."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies that have arrived to `message_ids`."""
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Send `messages` and collect their replies until all have come or `timeout` seconds have passed."""
        pending = set(self.push_messages(messages))
        deadline = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while timeout is None or time.monotonic() < deadline:
            arrived = list(self.pull_messages(pending))
            replies.extend(arrived)
            pending.difference_update(reply.metadata.reply_to_message_id for reply in arrived)
            if not pending:
                break
            time.sleep(self.pull_interval_s)
        return replies
