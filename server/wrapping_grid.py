"""A Flower Grid that passes everything to the grid it wraps: the base of the coordinator's grid layers."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class WrappingGrid(Grid):
    """Every Grid method passed to `wrapped` unchanged; a subclass overrides what its layer changes."""

    def __init__(self, wrapped: Grid) -> None:
        self.wrapped = wrapped

    def set_run(self, run) -> None:
        """Set the run the wrapped grid operates in."""
        self.wrapped.set_run(run)

    @property
    def run(self):
        """The wrapped grid's run."""
        return self.wrapped.run

    def create_message(self, *args, **kwargs) -> Message:
        """A message from the wrapped grid."""
        return self.wrapped.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        """The connected sites' node ids."""
        return self.wrapped.get_node_ids()

    def get_nodes(self):
        """The wrapped grid's nodes."""
        return self.wrapped.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Send `messages`; their ids."""
        return self.wrapped.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies that have arrived to `message_ids`."""
        return self.wrapped.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Send `messages` and collect their replies through the wrapped grid."""
        return self.wrapped.send_and_receive(messages, timeout=timeout)
