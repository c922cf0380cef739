"""Central differential privacy: the server clips each site's update and adds Gaussian noise (training only)."""

from __future__ import annotations

from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

from shared.config import RunConfig


class CentralPrivacyStrategy(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping around a recording strategy.

    Only training replies are clipped and noised; evaluation passes straight to the wrapped
    strategy. The wrapped strategy checkpoints the clipped average before the noise is added,
    so the round's checkpoint is rewritten with the noised model that the sites receive.
    """

    @property
    def round_offset(self) -> int:
        """The wrapped strategy's round offset of a resumed run."""
        return self.strategy.round_offset

    @round_offset.setter
    def round_offset(self, value: int) -> None:
        self.strategy.round_offset = value

    @property
    def privacy_budget(self):
        """The wrapped strategy's privacy record (privacy.json)."""
        return self.strategy.privacy_budget

    def aggregate_train(self, server_round, replies):
        """Clip every site's update, average, add noise, and checkpoint the noised model."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            self.strategy.checkpoints.save_round(server_round + self.strategy.round_offset, arrays)
        return arrays, metrics


def with_central_privacy(strategy, run: RunConfig, num_sites: int | None):
    """`strategy` wrapped in server-side clipping and noise when privacy.mode is 'central', else itself."""
    if run.privacy.mode != "central":
        return strategy
    federation = run.federation
    sites = num_sites if num_sites is not None else federation.min_sites
    sampled = max(1, round(sites * federation.fraction_train))
    return CentralPrivacyStrategy(
        strategy,
        noise_multiplier=run.privacy.noise_multiplier,
        clipping_norm=run.privacy.max_grad_norm,
        num_sampled_clients=sampled,
    )
