"""The server's view of the privacy budget: epsilon per site and round, privacy.json, and the clean stop."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message

from server.history import MetricHistory
from server.run_stop import RunStopped
from shared.config import RunConfig
from shared.durable_files import write_json_atomically
from shared.errors import SkinFLError
from shared.json_values import finite_or_none
from shared.privacy.accounting import gan_round_label
from shared.protocol import LEDGER_KEY, PRIVATE_SITES_KEY
from shared.run_folder import RunFolder

logger = logging.getLogger(__name__)


class PrivacyBudgetReached(RunStopped):
    """The next round would take a site past the run's epsilon budget; the run ends before it."""


def _site_name(reply: Message) -> str:
    record = reply.content.config_records.get("site")
    if record is not None and "name" in record:
        return str(record["name"])
    return f"node-{reply.metadata.src_node_id}"


def _site_privacy_metrics(replies: list[Message], what: str) -> dict[str, dict]:
    """Each successful site's train metrics; a site that trained `what` without reporting epsilon is an error."""
    found = {}
    for reply in replies:
        if reply.has_error():
            continue
        metrics = next(iter(reply.content.metric_records.values()))
        if "epsilon" not in metrics:
            raise SkinFLError(
                f"site {_site_name(reply)} trained {what} without reporting epsilon, in a run with privacy.mode "
                "'local'; update skin-fl at that site"
            )
        found[_site_name(reply)] = metrics
    return found


class PrivacyBudget:
    """Tracks every site's reported epsilon, writes privacy.json, and stops the run before the budget is passed.

    The state is read back from `privacy.json` when the run folder already has one, so a resumed
    run starts from the epsilon its sites already spent, and from the history's per-round records
    when only those survive.
    """

    def __init__(self, run: RunConfig, run_folder: Path) -> None:
        self.run = run
        self.run_folder = Path(run_folder)
        self.ledger_id = self.run_folder.name
        self.sites: dict[str, dict] = {}
        self.rounds: list[dict] = []
        self.stopped: dict | None = None
        self.gan_stopped: dict | None = None
        self._restore()
        self.save()

    def _restore(self) -> None:
        path = RunFolder(self.run_folder).privacy
        if path.exists():
            saved = json.loads(path.read_text())
            self.ledger_id = saved.get("ledger_id", self.ledger_id)
            self.sites = dict(saved.get("sites", {}))
            self.rounds = list(saved.get("rounds", []))
            self.gan_stopped = saved.get("gan_phase_stopped_early")
            return
        for entry in RunFolder(self.run_folder).history_rounds():
            if "privacy" in entry:
                self.rounds.append({"round": entry["round"], **entry["privacy"]})
                self.sites.update(entry["privacy"].get("sites", {}))

    @property
    def epsilon_spent(self) -> float:
        """The largest epsilon any site has spent so far (0 before the first private round)."""
        return max((site["epsilon"] for site in self.sites.values()), default=0.0)

    @property
    def epsilon_next_round(self) -> float:
        """The largest epsilon a site would have spent after one more round of its schedule."""
        return max((site["epsilon_next_round"] for site in self.sites.values()), default=0.0)

    def _name_ledger(self, config: ConfigRecord) -> None:
        """Name the run's ledger and the sites whose private rounds this run records (their ledgers must exist)."""
        config[LEDGER_KEY] = self.ledger_id
        config[PRIVATE_SITES_KEY] = json.dumps(sorted(self.sites))

    def before_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> None:
        """Name the ledger for the sites and raise PrivacyBudgetReached when round `server_round` would pass the budget."""
        if not self.run.privacy.local:
            return
        self._name_ledger(config)
        budget = self.run.privacy.target_epsilon
        if budget is None or not self.sites:
            return
        predicted = self.epsilon_next_round
        if predicted > budget + 1e-9:
            worst = max(self.sites, key=lambda name: self.sites[name]["epsilon_next_round"])
            message = (
                f"privacy budget reached: round {server_round} would take site {worst} from epsilon "
                f"{self.sites[worst]['epsilon']:.3f} to {predicted:.3f}, past the budget {budget} "
                f"(delta {self.run.privacy.target_delta}); the run stops after {server_round - 1} of "
                f"{self.run.federation.rounds} rounds"
            )
            self.stopped = {"before_round": server_round, "reason": message}
            self._announce_stop(message)
            raise PrivacyBudgetReached(message, arrays, server_round - 1)

    def before_gan_round(self, server_round: int, config: ConfigRecord) -> str | None:
        """Name the ledger for the sites; the reason to end the GAN phase when round `server_round` would pass the budget."""
        if not self.run.privacy.local:
            return None
        self._name_ledger(config)
        budget = self.run.privacy.target_epsilon
        following = {name: site["epsilon_next_gan_round"] for name, site in self.sites.items() if "epsilon_next_gan_round" in site}
        if budget is None or not following:
            return None
        worst = max(following, key=following.get)
        if following[worst] <= budget + 1e-9:
            return None
        message = (
            f"privacy budget reached in the GAN phase: GAN round {server_round} would take site {worst} from epsilon "
            f"{self.sites[worst]['epsilon']:.3f} to {following[worst]:.3f}, past the budget {budget}; the GAN phase "
            f"ends after {server_round - 1} of {self.run.gan.rounds} rounds"
        )
        self.gan_stopped = {"before_gan_round": server_round, "reason": message}
        self._announce_stop(message)
        return message

    def _announce_stop(self, message: str) -> None:
        """Save why training stopped, and say it in the log and on the console (every command shows the project's log)."""
        self.save()
        logger.warning(message)

    def after_gan_round(self, server_round: int, replies: list[Message]) -> dict:
        """Record the epsilon each site reported for GAN round `server_round`; returns the round's privacy entry."""
        if not self.run.privacy.local:
            return {}
        reported = {
            site: {
                "epsilon": float(metrics["epsilon"]),
                # What the classifier phase checks before its first round.
                "epsilon_next_round": float(metrics["epsilon-next-classifier-round"]),
                "epsilon_next_gan_round": float(metrics["epsilon-next-round"]),
                "noise_multiplier": float(metrics["noise-multiplier"]),
                "round": gan_round_label(server_round),
            }
            for site, metrics in _site_privacy_metrics(replies, f"GAN round {server_round}").items()
        }
        self.sites.update(reported)
        entry = {"round": gan_round_label(server_round), "epsilon_max": self.epsilon_spent, "sites": reported}
        self.rounds = [item for item in self.rounds if item["round"] != entry["round"]] + [entry]
        self.save()
        return {key: value for key, value in entry.items() if key != "round"}

    def after_train(self, server_round: int, replies: list[Message], history: MetricHistory) -> None:
        """Record the epsilon each site reported for `server_round`, in privacy.json and the history."""
        if not self.run.privacy.local:
            return
        reported = {
            site: {
                "epsilon": float(metrics["epsilon"]),
                "epsilon_next_round": float(metrics["epsilon-next-round"]),
                "noise_multiplier": float(metrics["noise-multiplier"]),
                "sample_rate": float(metrics.get("sample-rate", float("nan"))),
                "steps": int(metrics.get("dp-steps", 0)),
                "round": server_round,
            }
            for site, metrics in _site_privacy_metrics(replies, f"round {server_round}").items()
        }
        self.sites.update(reported)
        entry = {
            "round": server_round,
            "epsilon_max": self.epsilon_spent,
            "epsilon_next_round_max": self.epsilon_next_round,
            "sites": reported,
        }
        self.rounds = [item for item in self.rounds if item["round"] != server_round] + [entry]
        history_entry = history.rounds.get(server_round)
        if history_entry is not None:
            history_entry["privacy"] = {key: value for key, value in entry.items() if key != "round"}
            history.save()
        self.save()

    def save(self) -> None:
        """Write privacy.json: the settings, the budget spent per site and round, and why the run stopped."""
        privacy = self.run.privacy
        payload = {
            "settings": privacy.model_dump(mode="json"),
            "accounting": "RDP (Opacus), per site, over every DP-SGD step a site ran in this run"
            if privacy.local
            else ("none: Gaussian noise on the clipped site updates (server side)" if privacy.mode == "central" else "none"),
            "ledger_id": self.ledger_id,
            "epsilon_budget": privacy.target_epsilon,
            "delta": privacy.target_delta,
            "epsilon_spent_max": self.epsilon_spent,
            "sites": self.sites,
            "rounds": self.rounds,
            "stopped_early": self.stopped,
            "gan_phase_stopped_early": self.gan_stopped,
        }
        self.run_folder.mkdir(parents=True, exist_ok=True)
        write_json_atomically(RunFolder(self.run_folder).privacy, finite_or_none(payload))




def budget_stop_metadata(strategy) -> dict:
    """What the final model's metadata says about a privacy stop ({} when the run was not stopped)."""
    budget = getattr(strategy, "privacy_budget", None)
    if budget is None or budget.stopped is None:
        return {}
    return {"stopped_by_privacy_budget": budget.stopped["reason"], "completed_rounds": budget.stopped["before_round"] - 1}
