"""Ending a run cleanly before its last round: a stop raised between rounds, and the start that turns it into a result."""

from __future__ import annotations

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Result

from shared.errors import SkinFLError


class RunStopped(SkinFLError):
    """The run ends before its next round (privacy budget reached, validation no longer improving)."""

    def __init__(self, message: str, arrays: ArrayRecord, completed_rounds: int) -> None:
        super().__init__(message)
        self.arrays = arrays
        self.completed_rounds = completed_rounds


def start_until_stopped(strategy, **start_arguments) -> Result:
    """`strategy.start(...)`, ending cleanly with the last global model when a round raises `RunStopped`."""
    try:
        return strategy.start(**start_arguments)
    except RunStopped as stop:
        result = Result()
        result.arrays = stop.arrays
        return result
