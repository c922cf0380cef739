"""A site's own privacy policy: the largest epsilon a run and all runs together may spend, and whether it joins only private runs."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from shared.config import RunConfig, StrictModel
from shared.errors import ConfigError

NODE_CONFIG_PREFIX = "privacy-"
"""The policy travels to the ClientApp in the node config as `privacy-max-epsilon`, `privacy-lifetime-epsilon` and
`privacy-required-mode`."""
NODE_CONFIG_KEYS = ("privacy-max-epsilon", "privacy-lifetime-epsilon", "privacy-required-mode")


class PrivacyPolicyRefused(ConfigError):
    """The run asks for more than the site's privacy policy allows; nothing was trained."""


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class SitePrivacyPolicy(StrictModel):
    """What the site, not the coordinator, decides about privacy; checked before any step of any message of a run."""

    model_config = ConfigDict(extra="forbid", alias_generator=_kebab, populate_by_name=True)

    max_epsilon: float | None = Field(
        None,
        gt=0,
        description="Largest epsilon (at the run's delta) a run may spend on this site's images; set: only local-DP runs "
        "with a target epsilon at most this join.",
    )
    lifetime_epsilon: float | None = Field(
        None,
        gt=0,
        description="Largest epsilon all runs together may spend on this site's images: the steps recorded in every "
        "ledger of the site's privacy folder, composed (RDP) at the run's delta; set: only local-DP runs join, and a "
        "round that would pass it is refused before its first step.",
    )
    required_mode: Literal["any", "local"] = Field(
        "any", description="'local': join only runs with DP-SGD at every site (privacy.mode 'local'); 'any': any run."
    )

    @classmethod
    def from_node_config(cls, node_config: dict) -> SitePrivacyPolicy:
        """The policy in a node config (no `privacy-*` key: join any run)."""
        values = {
            key.removeprefix(NODE_CONFIG_PREFIX): value
            for key, value in dict(node_config).items()
            if key in NODE_CONFIG_KEYS
        }
        return cls.model_validate(values)

    def node_config(self) -> dict[str, str | float]:
        """The policy as node-config keys (only those that differ from joining any run)."""
        values: dict[str, str | float] = {}
        if self.max_epsilon is not None:
            values["privacy-max-epsilon"] = float(self.max_epsilon)
        if self.lifetime_epsilon is not None:
            values["privacy-lifetime-epsilon"] = float(self.lifetime_epsilon)
        if self.required_mode != "any":
            values["privacy-required-mode"] = self.required_mode
        return values

    def refusal(self, run: RunConfig) -> str | None:
        """Why this site does not join `run` (None: it may)."""
        privacy = run.privacy
        if self.required_mode == "local" and not privacy.local:
            return f"the site joins only runs with privacy.mode 'local' (DP-SGD at every site); this run has {privacy.mode!r}"
        if self.lifetime_epsilon is not None and not privacy.local:
            return (
                f"the site caps the epsilon of all its runs at {self.lifetime_epsilon}, and a run with privacy.mode "
                f"{privacy.mode!r} has no bound at the site"
            )
        if self.max_epsilon is None:
            return None
        if not privacy.local:
            return f"the site caps epsilon at {self.max_epsilon}, and a run with privacy.mode {privacy.mode!r} has no bound at the site"
        if privacy.target_epsilon is None:
            return f"the site caps epsilon at {self.max_epsilon}; the run sets no privacy.target_epsilon, so its spend is unbounded"
        if privacy.target_epsilon > self.max_epsilon:
            return f"the run's target epsilon {privacy.target_epsilon} is above the site's cap {self.max_epsilon}"
        return None

    def check(self, run: RunConfig) -> None:
        """Raise PrivacyPolicyRefused when the site's policy does not let it join `run`."""
        reason = self.refusal(run)
        if reason is not None:
            raise PrivacyPolicyRefused(
                f"{reason}; the coordinator must submit a run within the site's policy (the site's [privacy] settings)"
            )
