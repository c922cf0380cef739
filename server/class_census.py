"""The federation's training images per class, summed from the sites' counts, for balance 'global'."""

from __future__ import annotations

import logging
import time

from flwr.serverapp import Grid

from server.site_queries import ask_sites
from shared.config import RunConfig
from shared.errors import ConfigError
from shared.protocol import CLASS_COUNTS_KEY, CLASS_COUNTS_MESSAGE

logger = logging.getLogger(__name__)


def take_class_census(grid: Grid, run: RunConfig, server_round: int, min_sites: int) -> list[int]:
    """Ask every connected site for its training images per class (once `min_sites` are connected) and sum them.

    Only counts leave a site. A site that joins later trains with the federation's counts raised
    to at least its own (see shared.class_balance), so a class only it holds is still balanced.
    """
    while len(nodes := sorted(grid.get_node_ids())) < min_sites:
        logger.info("class census: waiting for sites, %d connected (minimum %d)", len(nodes), min_sites)
        time.sleep(1)
    totals = [0] * len(run.classes)
    answered = 0
    for answer in ask_sites(grid, run, CLASS_COUNTS_MESSAGE, server_round=server_round, purpose="class census", nodes=nodes):
        counts = list(answer.metrics[CLASS_COUNTS_KEY])
        if len(counts) != len(totals) or any(int(count) < 0 for count in counts):
            logger.warning("class census: node %s sent %d counts for %d classes; left out", answer.node, len(counts), len(totals))
            continue
        totals = [total + int(count) for total, count in zip(totals, counts)]
        answered += 1
    if answered == 0:
        raise ConfigError(
            "balance 'global' needs the sites' class counts and no site answered the class census; check that the "
            "sites run this version of skin-fl, or set train.balance 'sampler'"
        )
    logger.info(
        "class census: %d site(s), training images per class: %s",
        answered,
        ", ".join(f"{name} {count}" for name, count in zip(run.classes, totals)),
    )
    return totals
