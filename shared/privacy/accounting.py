"""Per-site privacy accounting (RDP): the site's ledger of DP-SGD steps, its epsilon and the noise schedule."""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from shared.config import PrivacyConfig, RunConfig
from shared.durable_files import write_json_atomically
from shared.errors import ConfigError, SkinFLError

LEDGER_FORMAT = "skin-fl-privacy-ledger"
EPSILON_TOLERANCE = 0.01
"""Opacus calibrates the noise so the spent epsilon lands within this much below the target."""


class PrivacyBudgetExceeded(SkinFLError):
    """Training would spend more epsilon than the run's budget allows."""


class PrivacyLedgerError(ConfigError):
    """A site's privacy ledger of a run is missing or unreadable where it must exist; training stops rather than count from zero."""


def gan_round_label(server_round: int) -> str:
    """How a GAN round is named in a site's privacy ledger and privacy.json (classifier rounds are plain numbers)."""
    return f"gan-{server_round}"


def sample_rate_for(train_size: int, batch_size: int) -> float:
    """Poisson sampling rate of one step: one over the batches per epoch (as Opacus derives it)."""
    if train_size < 2:
        raise ConfigError(f"DP-SGD needs at least 2 training images at a site, it has {train_size}; add images to this site")
    return 1.0 / math.ceil(train_size / batch_size)


CLASS_COUNTS_LABEL = "class-counts"
"""How the one release of a site's noisy class counts (linear-head recipe) is named in its ledger."""
CLASS_COUNTS_QUERY = (1.0, 1)
"""The class-count release as a DP phase: a Gaussian mechanism on every image at once (L2 sensitivity 1)."""


def classifier_batch_size(train_size: int, run: RunConfig) -> int:
    """The expected batch of a classifier DP-SGD step: the head's (every image by default) or train.batch_size."""
    if run.privacy.linear_head:
        return min(run.privacy.head_batch_size or train_size, train_size)
    return run.train.batch_size


def steps_per_round(train_size: int, run: RunConfig) -> int:
    """DP-SGD steps one site takes in a round: the head's steps, or batches per epoch (capped) times local epochs."""
    if run.privacy.linear_head:
        return run.privacy.head_steps_per_round
    per_epoch = int(round(1.0 / sample_rate_for(train_size, run.train.batch_size)))
    if run.train.max_steps_per_epoch is not None:
        per_epoch = min(per_epoch, run.train.max_steps_per_epoch)
    return per_epoch * run.train.whole_local_epochs()


def epsilon_of(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon spent by the DP-SGD steps in `history` ((noise multiplier, sample rate, steps) entries)."""
    from opacus.accountants import RDPAccountant

    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(float(noise), float(rate), int(steps)) for noise, rate, steps in history]
    with warnings.catch_warnings():
        # Said of every large epsilon (little noise), which noise calibration tries on its way.
        warnings.filterwarnings("ignore", message=".*Optimal order is the (largest|smallest) alpha.*")
        return float(accountant.get_epsilon(delta=delta))


def planned_phases(run: RunConfig, train_size: int) -> tuple[tuple[float, int], ...]:
    """(sampling rate, steps) of every DP-SGD phase a site runs in the whole run: GAN discriminator, classifier."""
    phases = []
    if run.gan.rounds > 0:
        phases.append((sample_rate_for(train_size, run.gan.batch_size), run.gan.rounds * run.gan.local_steps))
    if not run.gan.only:
        sample_rate = sample_rate_for(train_size, classifier_batch_size(train_size, run))
        phases.append((sample_rate, steps_per_round(train_size, run) * run.federation.rounds))
        if run.privacy.linear_head:
            phases.append(CLASS_COUNTS_QUERY)
    return tuple(phases)


def noise_multiplier_for(privacy: PrivacyConfig, phases: tuple[tuple[float, int], ...]) -> float:
    """The noise multiplier of a site: the configured one, or the one that spends the target epsilon over `phases`.

    One multiplier serves every phase (GAN discriminator and classifier), so the budget is
    shared in proportion to the steps each phase takes and their sampling rates.
    """
    if privacy.noise_multiplier is not None:
        return float(privacy.noise_multiplier)
    try:
        return _calibrated_noise(privacy.target_epsilon, privacy.target_delta, tuple(phases))
    except ValueError as error:
        described = ", ".join(f"{steps} steps at sampling rate {rate:.4f}" for rate, steps in phases)
        raise ConfigError(
            f"no noise multiplier reaches epsilon {privacy.target_epsilon} at delta {privacy.target_delta} "
            f"over {described} ({error}); raise target_epsilon or target_delta, or train fewer rounds / local "
            "epochs / GAN steps"
        ) from error


MAX_NOISE_MULTIPLIER = 1e4


@lru_cache(maxsize=64)
def _calibrated_noise(target_epsilon: float, target_delta: float, phases: tuple[tuple[float, int], ...]) -> float:
    """The smallest noise multiplier (within EPSILON_TOLERANCE of the target epsilon) that spends at most the target.

    A bisection over RDP curves: every round of a run asks the same question, hence the cache.
    """
    def spent(noise: float) -> float:
        return epsilon_of([(noise, rate, steps) for rate, steps in phases], target_delta)

    high = 1.0
    while spent(high) > target_epsilon:
        high *= 2
        if high > MAX_NOISE_MULTIPLIER:
            raise ValueError(f"even noise multiplier {MAX_NOISE_MULTIPLIER:g} spends more")
    low = 0.0
    while high - low > 1e-6 and spent(high) < target_epsilon - EPSILON_TOLERANCE:
        middle = (low + high) / 2
        if spent(middle) > target_epsilon:
            low = middle
        else:
            high = middle
    return high


@dataclass
class RoundSchedule:
    """One site's DP-SGD plan for a round: sampling rate, steps, noise, and the whole run's step count."""

    sample_rate: float
    steps: int
    noise_multiplier: float
    run_steps: int

    @classmethod
    def for_site(cls, run: RunConfig, train_size: int) -> RoundSchedule:
        """A classifier round of a site with `train_size` training images; the noise covers the whole run."""
        rate = sample_rate_for(train_size, classifier_batch_size(train_size, run))
        return cls._in_run(run, train_size, rate, steps_per_round(train_size, run))

    @classmethod
    def for_class_counts(cls, run: RunConfig, train_size: int) -> RoundSchedule:
        """The one release of a site's noisy class counts (linear-head recipe), at the site's noise multiplier."""
        return cls._in_run(run, train_size, *CLASS_COUNTS_QUERY)

    @classmethod
    def for_gan(cls, run: RunConfig, train_size: int) -> RoundSchedule:
        """A GAN round (discriminator DP-SGD) of a site with `train_size` training images, same noise as its classifier."""
        return cls._in_run(run, train_size, sample_rate_for(train_size, run.gan.batch_size), run.gan.local_steps)

    @classmethod
    def _in_run(cls, run: RunConfig, train_size: int, sample_rate: float, steps: int) -> RoundSchedule:
        phases = planned_phases(run, train_size)
        return cls(sample_rate, steps, noise_multiplier_for(run.privacy, phases), sum(count for _, count in phases))

    def entry(self) -> tuple[float, float, int]:
        """This round as an RDP accountant history entry."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


def _ledger_payload(path: Path, site: str) -> dict:
    """A ledger file's contents, checked to be `site`'s ledger; unreadable is an error, never zero."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise PrivacyLedgerError(
            f"privacy ledger {path} is unreadable ({error}); it records the budget this site already spent, so "
            "training stops rather than restart the count; restore the file from a backup"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != LEDGER_FORMAT or payload.get("site") != site:
        raise ConfigError(f"{path} is not the privacy ledger of site {site!r}; move it away only if it belongs to another site")
    return payload


def _history_of(rounds: list[dict]) -> list[tuple[float, float, int]]:
    return [(entry["noise_multiplier"], entry["sample_rate"], entry["steps"]) for entry in rounds]


@dataclass
class PrivacyLedger:
    """A site's record of every DP-SGD round it ran in one federated run, kept in a JSON file at the site.

    With a `lifetime_epsilon` (the site's own cap over all its runs), the ledger also holds the
    steps of every other run recorded in the site's privacy folder, composed with this run's in
    `lifetime_epsilon_after`.
    """

    path: Path
    site: str
    delta: float
    rounds: list[dict] = field(default_factory=list)
    lifetime_epsilon: float | None = None
    other_runs_history: list[tuple[float, float, int]] = field(default_factory=list)

    @classmethod
    def open(
        cls, state_dir: Path, site: str, ledger_id: str, delta: float, *, must_exist: bool = False,
        lifetime_epsilon: float | None = None,
    ) -> PrivacyLedger:
        """The ledger of `site` for the run `ledger_id` under `state_dir` (empty when the run is new).

        `must_exist`: the coordinator's records show this site already trained privately in the
        run, so a missing file is an error (a wiped or restored disk must not reset the budget).
        `lifetime_epsilon`: the site's cap over every run; the other runs' ledgers beside this one
        are read (an unreadable one is an error: it holds spent budget).
        """
        safe = lambda text: re.sub(r"[^A-Za-z0-9._-]+", "_", text)  # noqa: E731 - one-line file-name filter
        path = Path(state_dir) / safe(site) / f"{safe(ledger_id)}.json"
        others = []
        if lifetime_epsilon is not None and path.parent.is_dir():
            for other in sorted(path.parent.glob("*.json")):
                if other != path:
                    others += _history_of(_ledger_payload(other, site)["rounds"])
        if not path.exists():
            if must_exist:
                raise PrivacyLedgerError(
                    f"privacy ledger {path} is missing, but the coordinator's records show site {site!r} already trained "
                    f"privately in run {ledger_id!r}; restore the file from a backup (or point the node config's "
                    "privacy-dir at the folder that holds it); the budget is not restarted from zero"
                )
            return cls(path, site, delta, lifetime_epsilon=lifetime_epsilon, other_runs_history=others)
        payload = _ledger_payload(path, site)
        if float(payload["delta"]) != float(delta):
            raise ConfigError(
                f"privacy ledger {path} accounts at delta {payload['delta']}, this run asks for delta {delta}; "
                "keep target_delta unchanged within a run (resume with the same settings)"
            )
        return cls(path, site, float(payload["delta"]), list(payload["rounds"]), lifetime_epsilon, others)

    def released(self, round_label: str) -> dict | None:
        """The entry of an earlier release named `round_label` (its noisy values), or None when there was none."""
        return next((entry for entry in self.rounds if entry["round"] == round_label), None)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """Every round's (noise multiplier, sample rate, steps), as the RDP accountant takes them."""
        return _history_of(self.rounds)

    def lifetime_epsilon_after(self, entries: list[tuple[float, float, int]]) -> float:
        """Epsilon at this run's delta of every run's recorded steps at the site plus `entries` (RDP composition)."""
        return epsilon_of(self.other_runs_history + self.history + list(entries), self.delta)

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far by this site in this run."""
        return epsilon_of(self.history, self.delta)

    def epsilon_after(self, schedule: RoundSchedule, rounds: int = 1) -> float:
        """Epsilon this site would have spent after `rounds` more rounds of `schedule`."""
        return epsilon_of(self.history + [schedule.entry()] * rounds, self.delta)

    def record(
        self, server_round: int | str, noise_multiplier: float, sample_rate: float, steps: int, released: dict | None = None
    ) -> float:
        """Append a finished round (a classifier round number, "gan-N" or "class-counts"; every execution counts,
        retries too) and save; `released` keeps what the round released (noisy counts). Returns the epsilon now spent."""
        self.rounds.append(
            {"round": server_round, "noise_multiplier": noise_multiplier, "sample_rate": sample_rate, "steps": steps, **(released or {})}
        )
        self.rounds[-1]["epsilon"] = self.epsilon
        self.save()
        return self.rounds[-1]["epsilon"]

    def save(self) -> None:
        """Write the ledger crash-safely (flushed to disk before the round's reply leaves the site)."""
        payload = {"format": LEDGER_FORMAT, "site": self.site, "delta": self.delta, "rounds": self.rounds}
        write_json_atomically(self.path, payload, allow_nan=True)
