"""The coordinator's side of the reply rules: site error replies are reduced to their fixed code before any code sees them."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Error, Message

from server.wrapping_grid import WrappingGrid
from shared.protocol import ScreenedSiteError


def screened(reply: Message) -> Message:
    """`reply`, or for an error reply the same reply with its text replaced by the screened site error."""
    if not reply.has_error():
        return reply
    kept = ScreenedSiteError.of(reply.error.reason)
    if kept.reason == reply.error.reason:
        return reply
    return Message(error=Error(code=reply.error.code, reason=kept.reason), metadata=reply.metadata)


class ScreenedGrid(WrappingGrid):
    """A Grid whose replies never carry a site's free error text into the server's logs, history or reports.

    Sites running this version already send only fixed codes; this also covers older sites and
    the errors Flower builds itself (which hold `str(exception)`).
    """

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull through the wrapped grid, screening error replies."""
        return [screened(reply) for reply in self.wrapped.pull_messages(message_ids)]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Send and receive through the wrapped grid, screening error replies."""
        return [screened(reply) for reply in self.wrapped.send_and_receive(messages, timeout=timeout)]
