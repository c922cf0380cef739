"""Strategies that checkpoint the global model, keep the metric history and schedule the rates."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from server.aggregation import aggregate_site_metrics
from server.batch_norm_recalibration import recalibrate_batch_norm
from server.central_privacy import with_central_privacy
from server.checkpoint import CheckpointWriter, array_record_to_numpy
from server.class_census import take_class_census
from server.history import MetricHistory
from server.model_selection import rounds_since_best_validation
from server.privacy_budget import PrivacyBudget
from server.round_summary import round_summary_line
from server.run_stop import RunStopped
from server.tensorboard_log import TensorBoardLog
from shared.aggregation import ServerOptimiser
from shared.config import RoundInstructions, RunConfig
from shared.protocol import INSTRUCTIONS_KEY

SITE_RECORD_KEY = "site"
logger = logging.getLogger(__name__)


def site_name_of(message: Message) -> str:
    """The site name a reply carries, or its node id when it names none."""
    record = message.content.config_records.get(SITE_RECORD_KEY)
    if record is not None and "name" in record:
        return str(record["name"])
    return f"node-{message.metadata.src_node_id}"


def _per_site_metrics(replies: list[Message]) -> dict[str, dict]:
    per_site = {}
    for reply in replies:
        if reply.has_error():
            continue
        metrics = next(iter(reply.content.metric_records.values()))
        per_site[site_name_of(reply)] = dict(metrics)
    return per_site


class RecordingMixin:
    """Adds round instructions, checkpoints and the metric history to a Flower strategy."""

    run: RunConfig
    history: MetricHistory
    checkpoints: CheckpointWriter
    round_offset: int = 0
    """Rounds a resumed run already completed: Flower counts from 1 again, the run goes on from here."""
    privacy_budget: PrivacyBudget | None = None
    """Epsilon per site and the budget stop of a run with local DP (None without it)."""
    early_stop: dict | None = None
    """Where early stopping ended the run (None: it did not)."""
    tensorboard: TensorBoardLog | None = None
    """Per-round TensorBoard event files (None unless the run asks for them)."""
    federation_class_counts: list[int] | None = None
    """The sites' summed training class counts (balance 'global'; counted before the first round this process runs)."""

    def setup_recording(self, run: RunConfig, history: MetricHistory, checkpoints: CheckpointWriter) -> None:
        """Attach the run settings and the run-folder writers."""
        self.run = run
        self.history = history
        self.checkpoints = checkpoints
        self._phase_started = time.monotonic()
        self._asked_nodes: set[int] = set()
        self._site_of_node: dict[int, str] = {}

    def _ask(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        self._asked_nodes = {message.metadata.dst_node_id for message in messages}
        return messages

    def _missing_sites(self, replies: list[Message]) -> list[str]:
        """Sites asked this round that sent no usable reply (dropped out, timed out or failed)."""
        answered = set()
        for reply in replies:
            if not reply.has_error():
                node = reply.metadata.src_node_id
                self._site_of_node[node] = site_name_of(reply)
                answered.add(node)
        return [self._site_of_node.get(node, f"node-{node}") for node in self._asked_nodes - answered]

    def _stop_if_no_longer_improving(self, server_round: int, arrays: ArrayRecord) -> None:
        patience = self.run.federation.early_stopping_patience
        if patience is None:
            return
        waited = rounds_since_best_validation(self.history)
        if waited is not None and waited >= patience:
            self.early_stop = {"before_round": server_round, "rounds_without_improvement": waited}
            raise RunStopped(
                f"early stopping before round {server_round}: {waited} round(s) without a better validation balanced accuracy",
                arrays,
                server_round - 1,
            )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send this round's instructions (settings and learning-rate schedule) with the weights."""
        server_round += self.round_offset
        self._stop_if_no_longer_improving(server_round, arrays)
        if self.run.train.balance == "global" and self.federation_class_counts is None:
            self.federation_class_counts = take_class_census(grid, self.run, server_round, self.min_available_nodes)
        instructions = RoundInstructions.for_round(self.run, server_round, self.federation_class_counts)
        config[INSTRUCTIONS_KEY] = instructions.model_dump_json()
        if self.privacy_budget is not None:
            self.privacy_budget.before_train(server_round, arrays, config)
        self._phase_started = time.monotonic()
        self._round_start_arrays = arrays
        self._grid = grid
        return self._ask(super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the evaluation instructions with the new global weights."""
        server_round += self.round_offset
        instructions = RoundInstructions.for_round(self.run, server_round)
        config[INSTRUCTIONS_KEY] = instructions.model_dump_json()
        self._phase_started = time.monotonic()
        return self._ask(super().configure_evaluate(server_round, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate, then checkpoint the new global model and record who trained."""
        server_round += self.round_offset
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            arrays = self.server_step(arrays)
            if self.run.federation.batch_norm == "recalibrate":
                trained = [reply.metadata.src_node_id for reply in replies if not reply.has_error()]
                arrays = recalibrate_batch_norm(self._grid, self.run, arrays, trained, server_round)
        self.history.record_train(
            server_round,
            dict(metrics) if metrics is not None else {},
            _per_site_metrics(replies),
            time.monotonic() - self._phase_started,
            missing=self._missing_sites(replies),
        )
        if self.privacy_budget is not None:
            self.privacy_budget.after_train(server_round, replies, self.history)
        # The checkpoint holds exactly the arrays this round hands on. A round no site finished keeps the
        # global model, and is checkpointed too, so resume finds every round.
        self.checkpoints.save_round(server_round, arrays if arrays is not None else self._round_start_arrays)
        server_state = self.server_state()
        if server_state is not None:
            self.checkpoints.save_server_state(server_round, server_state)
        return arrays, metrics

    def server_step(self, averaged: ArrayRecord) -> ArrayRecord:
        """The next global model from the sites' average: the average itself (FedAvg, FedProx)."""
        return averaged

    def server_state(self) -> dict | None:
        """The server optimiser's state to checkpoint with each round (None: FedAvg and FedProx keep none)."""
        return None

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Aggregate site evaluations and record them per site."""
        server_round += self.round_offset
        replies = list(replies)
        metrics = super().aggregate_evaluate(server_round, replies)
        self.history.record_evaluate(
            server_round,
            dict(metrics) if metrics is not None else {},
            _per_site_metrics(replies),
            time.monotonic() - self._phase_started,
            missing=self._missing_sites(replies),
        )
        logger.info(round_summary_line(self.history.rounds[server_round], self.run.federation.rounds))
        if self.tensorboard is not None:
            self.tensorboard.write_round(self.history.rounds[server_round])
        return metrics


class RecordingFedAvg(RecordingMixin, FedAvg):
    """FedAvg (McMahan et al., 2017) with skin-fl's checkpoints and history."""


class RecordingFedProx(RecordingMixin, FedProx):
    """FedProx (Li et al., 2020): sites add a proximal term; server averages like FedAvg."""


class RecordingServerOptimiser(RecordingMixin, FedAvg):
    """FedAvgM (server momentum, Hsu et al. 2019) or FedAdam (Reddi et al. 2021) over the sites' average.

    The step is `shared.aggregation.ServerOptimiser`'s (BatchNorm statistics take the plain
    average), the same arithmetic skin-fl-bench runs; the round checkpoint holds its result.
    """

    def __init__(self, optimiser: ServerOptimiser, **kwargs) -> None:
        super().__init__(**kwargs)
        self.optimiser = optimiser

    def server_state(self) -> dict:
        """The momentum (and FedAdam's second moment and step count) after the last round."""
        return self.optimiser.state()

    def server_step(self, averaged: ArrayRecord) -> ArrayRecord:
        """One server-optimiser step from the round's starting global model towards the sites' average."""
        stepped = self.optimiser.step(array_record_to_numpy(self._round_start_arrays), array_record_to_numpy(averaged))
        return ArrayRecord({name: Array(value) for name, value in stepped.items()})


def build_strategy(
    run: RunConfig, history: MetricHistory, checkpoints: CheckpointWriter, num_sites: int | None = None, round_offset: int = 0
):
    """The configured strategy with recording, site sampling and metric aggregation.

    `round_offset` is the number of rounds a resumed run already completed.
    """
    federation = run.federation
    common = dict(
        fraction_train=federation.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=min(federation.min_sites, num_sites or federation.min_sites),
        min_evaluate_nodes=min(federation.min_sites, num_sites or federation.min_sites),
        min_available_nodes=min(federation.min_sites, num_sites or federation.min_sites),
        train_metrics_aggr_fn=aggregate_site_metrics,
        evaluate_metrics_aggr_fn=aggregate_site_metrics,
    )
    if federation.strategy == "fedprox":
        strategy = RecordingFedProx(proximal_mu=federation.proximal_mu, **common)
    elif federation.strategy in ("fedadam", "fedavgm"):
        optimiser = ServerOptimiser.for_strategy(
            federation.strategy,
            server_learning_rate=federation.server_learning_rate,
            server_momentum=federation.server_momentum,
        )
        strategy = RecordingServerOptimiser(optimiser, **common)
    else:
        strategy = RecordingFedAvg(**common)
    strategy.setup_recording(run, history, checkpoints)
    strategy.round_offset = round_offset
    if round_offset and isinstance(strategy, RecordingServerOptimiser):
        state = checkpoints.load_server_state(round_offset)
        if state is None:
            logger.warning(
                "resume: no server optimiser state was kept after round %d; %s's moments start again from zero",
                round_offset, federation.strategy,
            )
        else:
            strategy.optimiser.load_state(state)
    if run.tracking.tensorboard:
        strategy.tensorboard = TensorBoardLog(history.run_folder)
    if run.privacy.mode != "off":
        strategy.privacy_budget = PrivacyBudget(run, history.run_folder)
        strategy = with_central_privacy(strategy, run, num_sites)
    return strategy
