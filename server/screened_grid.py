"""The coordinator's side of the reply rules: site error replies are reduced to their fixed code before any code sees them."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Error, Message
from flwr.serverapp import Grid

from shared.protocol import ScreenedSiteError


def screened(reply: Message) -> Message:
    """`reply`, or for an error reply the same reply with its text replaced by the screened site error."""
    if not reply.has_error():
        return reply
    kept = ScreenedSiteError.of(reply.error.reason)
    if kept.reason == reply.error.reason:
        return reply
    return Message(error=Error(code=reply.error.code, reason=kept.reason), metadata=reply.metadata)


class ScreenedGrid(Grid):
    """A Grid whose replies never carry a site's free error text into the server's logs, history or reports.

    Sites running this version already send only fixed codes; this also covers older sites and
    the errors Flower builds itself (which hold `str(exception)`).
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def set_run(self, run) -> None:
        """Set the run of the wrapped grid."""
        self._grid.set_run(run)

    @property
    def run(self):
        """The wrapped grid's run."""
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:
        """Create a message through the wrapped grid."""
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        """The wrapped grid's node ids."""
        return self._grid.get_node_ids()

    def get_nodes(self):
        """The wrapped grid's nodes."""
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push through the wrapped grid."""
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull through the wrapped grid, screening error replies."""
        return [screened(reply) for reply in self._grid.pull_messages(message_ids)]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Send and receive through the wrapped grid, screening error replies."""
        return [screened(reply) for reply in self._grid.send_and_receive(messages, timeout=timeout)]
