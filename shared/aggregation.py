"""Server-side aggregation in plain numpy: example-weighted averaging and the server optimisers over it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from shared.errors import ConfigError, ModelError

BATCH_NORM_STATISTICS = ("running_mean", "running_var")
SERVER_OPTIMISERS = ("average", "momentum", "adam")


def is_batch_norm_statistic(name: str) -> bool:
    """Whether an exchanged array is a BatchNorm running statistic (averaged, never stepped)."""
    return name.endswith(BATCH_NORM_STATISTICS)


def weighted_average(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Example-weighted mean of the sites' arrays (FedAvg), in float64 then cast back to each array's dtype."""
    if not updates:
        raise ModelError("no site update to aggregate; at least one site must finish the round")
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ModelError(f"site weights {list(weights)} sum to {total}; every site must report its number of examples")
    names = list(updates[0])
    for update in updates[1:]:
        if list(update) != names:
            raise ModelError("sites sent different sets of arrays; every site must train the same model")
    averaged = {}
    for name in names:
        total_array = sum(np.asarray(update[name], dtype=np.float64) * (weight / total) for update, weight in zip(updates, weights))
        averaged[name] = np.asarray(total_array, dtype=np.asarray(updates[0][name]).dtype)
    return averaged


class ServerOptimiser:
    """Turns the sites' averaged weights into the next global model (Reddi et al. 2021's framing).

    The pseudo-gradient is `average - current`. `average` (FedAvg) takes the average as it is;
    `momentum` (FedAvgM, Hsu et al. 2019) keeps v = beta v + delta and steps current + lr v;
    `adam` (FedAdam) steps current + lr_t m / (sqrt(v) + tau) with Adam's moment estimates and
    its bias correction lr_t = lr sqrt(1 - beta2^t) / (1 - beta1^t) at server step t.
    BatchNorm running statistics always take the plain average: a server step on a mean or a
    variance has no meaning (and can push a variance below zero).
    """

    def __init__(
        self,
        kind: str = "average",
        *,
        learning_rate: float = 1.0,
        momentum: float = 0.9,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        if kind not in SERVER_OPTIMISERS:
            raise ConfigError(f"server optimiser {kind!r} is not one of {list(SERVER_OPTIMISERS)}")
        self.kind = kind
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self.first_moment: dict[str, np.ndarray] = {}
        self.second_moment: dict[str, np.ndarray] = {}
        self.steps = 0

    @classmethod
    def for_strategy(cls, strategy: str, *, server_learning_rate: float, server_momentum: float) -> ServerOptimiser:
        """The server optimiser of a named strategy: FedAdam steps `server_learning_rate`, FedAvgM 1.0 with momentum."""
        if strategy == "fedadam":
            return cls("adam", learning_rate=server_learning_rate)
        if strategy == "fedavgm":
            return cls("momentum", learning_rate=1.0, momentum=server_momentum)
        return cls("average")

    def step(self, current: Mapping[str, np.ndarray], average: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The next global arrays from the current global arrays and the sites' average."""
        if self.kind == "average":
            return {name: np.array(value, copy=True) for name, value in average.items()}
        self.steps += 1
        corrected_rate = self.learning_rate * np.sqrt(1 - self.beta2**self.steps) / (1 - self.beta1**self.steps)
        updated = {}
        for name, averaged in average.items():
            if is_batch_norm_statistic(name) or not np.issubdtype(np.asarray(averaged).dtype, np.floating):
                updated[name] = np.array(averaged, copy=True)
                continue
            base = np.asarray(current[name], dtype=np.float64)
            delta = np.asarray(averaged, dtype=np.float64) - base
            if self.kind == "momentum":
                velocity = self.momentum * self.first_moment.get(name, 0.0) + delta
                self.first_moment[name] = velocity
                step = self.learning_rate * velocity
            else:
                first = self.beta1 * self.first_moment.get(name, 0.0) + (1 - self.beta1) * delta
                second = self.beta2 * self.second_moment.get(name, 0.0) + (1 - self.beta2) * delta**2
                self.first_moment[name], self.second_moment[name] = first, second
                step = corrected_rate * first / (np.sqrt(second) + self.tau)
            updated[name] = (base + step).astype(np.asarray(averaged).dtype)
        return updated

    def state(self) -> dict[str, np.ndarray]:
        """The optimiser's moments as named arrays (saved with a checkpoint, so a resumed run continues them)."""
        return {
            "steps": np.asarray(self.steps),
            **{f"first/{k}": v for k, v in self.first_moment.items()},
            **{f"second/{k}": v for k, v in self.second_moment.items()},
        }

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore moments written by `state`."""
        self.steps = int(state.get("steps", 0))
        self.first_moment = {k.split("/", 1)[1]: np.asarray(v) for k, v in state.items() if k.startswith("first/")}
        self.second_moment = {k.split("/", 1)[1]: np.asarray(v) for k, v in state.items() if k.startswith("second/")}
