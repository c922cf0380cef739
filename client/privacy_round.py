"""The site's DP-SGD round trainer: opens the site's privacy ledger for the run and trains under DP-SGD."""

from __future__ import annotations

import json
from collections.abc import Callable

from flwr.app import Context, Message

from shared.config import RunConfig
from shared.privacy.accounting import PrivacyLedger
from shared.privacy.site_policy import SitePrivacyPolicy
from shared.privacy.training import PrivateTrainResult, train_privately
from shared.protocol import LEDGER_KEY, PRIVATE_SITES_KEY


def ledger_id_of(message: Message, context: Context) -> str:
    """The run whose ledger this round continues: the server's run-folder name, else the Flower run id."""
    config = message.content["config"]
    return str(config[LEDGER_KEY]) if LEDGER_KEY in config else f"flower-run-{context.run_id}"


def open_site_ledger(source, context: Context, message: Message, site: str, run: RunConfig) -> PrivacyLedger:
    """This site's ledger of the message's run, in the site's own privacy folder; must exist when the coordinator saw it
    train privately; it carries the site policy's lifetime cap (with the other runs' recorded steps)."""
    config = message.content["config"]
    recorded = json.loads(str(config[PRIVATE_SITES_KEY])) if PRIVATE_SITES_KEY in config else []
    return PrivacyLedger.open(
        source.privacy_state_dir(context), site, ledger_id_of(message, context), run.privacy.target_delta,
        must_exist=site in recorded, lifetime_epsilon=SitePrivacyPolicy.from_node_config(context.node_config).lifetime_epsilon,
    )


def private_round_trainer(
    source, context: Context, message: Message, site: str, run: RunConfig, server_round: int
) -> Callable[..., PrivateTrainResult]:
    """A trainer with `train_on_images`'s call signature that runs the round under DP-SGD and records it."""
    ledger = open_site_ledger(source, context, message, site, run)

    def train(
        model, images, *, config, device, precision, learning_rate_start, learning_rate_end, seed, global_arrays=None,
        federation_class_counts=None, description="train",
    ):
        # `config` is run.train; `global_arrays` only feeds FedProx, which the run settings exclude under DP.
        del config, global_arrays, federation_class_counts  # balance "global" is refused under local DP
        return train_privately(
            model,
            images,
            run=run,
            ledger=ledger,
            server_round=server_round,
            device=device,
            precision=precision,
            learning_rate_start=learning_rate_start,
            learning_rate_end=learning_rate_end,
            seed=seed,
            description=description,
        )

    return train
