"""The coordinator's grid with a short reply check: Flower's deployment grid sleeps a fixed 3 s between checks."""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from server.wrapping_grid import WrappingGrid

PULL_INTERVAL_S = 0.25
"""Seconds between checks for the sites' replies: each phase of a round ends at most this long after the last reply."""


class PromptGrid(WrappingGrid):
    """Flower's grid, whose `send_and_receive` checks for replies every `pull_interval_s` seconds.

    Flower's deployment grid checks every 3 s, so every phase of every round (train, evaluate,
    each query) waits 1.5 s on average after its last reply; its in-memory simulation grid checks
    every 0.1 s. Everything else is passed to the wrapped grid unchanged.
    """

    def __init__(self, grid: Grid, pull_interval_s: float = PULL_INTERVAL_S) -> None:
        if pull_interval_s <= 0:
            raise ValueError(f"pull interval {pull_interval_s} s must be positive")
        super().__init__(grid)
        self.pull_interval_s = pull_interval_s

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
