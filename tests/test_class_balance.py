"""Class balance over the federation: sampling weights, a site's share of a balanced pass, and the server's census."""

import numpy as np
import pytest
import torch
from flwr.app import MetricRecord, RecordDict

from fake_grid import error_reply, site_reply, use_plain_messages
from shared.class_balance import balanced_class_draws, balanced_epoch_share, counts_seen_by_site, federation_balanced_weights
from shared.config import RunConfig, TrainConfig
from shared.data.cache import CachedImages
from shared.errors import ConfigError
from shared.local_training import batch_class_counts, epoch_samples
from shared.training import BalancedSoftmaxLoss, log_class_prior

SITES = {"a": [8, 2, 0], "b": [2, 2, 4]}
FEDERATION = [10, 4, 4]


def _images(counts: list[int]) -> CachedImages:
    labels = np.repeat(np.arange(len(counts)), counts)
    return CachedImages(
        images=np.zeros((labels.size, 4, 4, 3), dtype=np.uint8),
        labels=labels,
        image_ids=[f"image-{index}" for index in range(labels.size)],
        splits=np.asarray(["train"] * labels.size),
        classes=["x", "y", "z"],
    )


def test_the_sites_shares_of_a_balanced_pass_add_up_to_one_pooled_pass_with_every_class_equally_often():
    draws = {site: balanced_class_draws(counts, FEDERATION) for site, counts in SITES.items()}
    # 18 images, 3 classes: a balanced pooled pass draws each class 6 times; site a holds 8/10 of class x.
    assert draws["a"] == pytest.approx([4.8, 3.0, 0.0])
    assert draws["b"] == pytest.approx([1.2, 3.0, 6.0])
    assert sum(draws.values()) == pytest.approx([6.0, 6.0, 6.0])
    assert balanced_epoch_share(SITES["a"], FEDERATION) + balanced_epoch_share(SITES["b"], FEDERATION) == pytest.approx(18)


def test_an_image_is_drawn_by_one_over_the_federations_images_of_its_class():
    labels = np.array([0, 1, 2, 2])
    weights = federation_balanced_weights(labels, FEDERATION)
    assert torch.allclose(weights, torch.tensor([1 / 10, 1 / 4, 1 / 4, 1 / 4], dtype=torch.float64))


def test_a_site_the_census_missed_counts_at_least_its_own_images():
    # A class only the late site holds: the federation's count 0 becomes the site's own 3.
    assert counts_seen_by_site([1, 0, 3], [10, 4, 0]).tolist() == [10, 4, 3]
    assert balanced_class_draws([0, 0, 3], [10, 4, 0])[2] == pytest.approx(17 / 3)
    with pytest.raises(ConfigError, match="same class list"):
        counts_seen_by_site([1, 2], FEDERATION)


def test_a_pass_under_global_balance_draws_the_sites_share_and_balanced_softmax_shifts_by_it():
    config = TrainConfig(balance="global", loss="balanced-softmax")
    images = _images(SITES["a"])
    assert epoch_samples(images, config, FEDERATION) == 8  # 4.8 + 3.0, rounded
    assert epoch_samples(images, TrainConfig(), FEDERATION) == 10
    shares = batch_class_counts(images, config, FEDERATION)
    loss = BalancedSoftmaxLoss(shares)
    assert torch.allclose(loss.log_prior, log_class_prior(np.array([4.8, 3.0, 0.0])))
    with pytest.raises(ConfigError, match="federation's class counts"):
        epoch_samples(images, config, None)


def test_global_balance_is_refused_under_local_privacy():
    with pytest.raises(ValueError, match="balance 'global'"):
        RunConfig(
            train={"balance": "global"},
            privacy={"mode": "local", "target_epsilon": 8.0},
        )


class _CountingGrid:
    """Answers every class-count query with the counts given per node (None: an error reply)."""

    def __init__(self, answers: dict) -> None:
        self.answers = answers

    def get_node_ids(self):
        return list(self.answers)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            node, counts = message.metadata.dst_node_id, self.answers[message.metadata.dst_node_id]
            if counts is None:
                replies.append(error_reply(node, "site-data"))
                continue
            replies.append(site_reply(node, RecordDict({"metrics": MetricRecord({"num-examples": sum(counts), "class-counts": counts})})))
        return replies


def test_the_census_sums_the_sites_counts_leaves_out_bad_answers_and_needs_one(monkeypatch):
    from server.class_census import take_class_census

    use_plain_messages(monkeypatch)

    run = RunConfig(classes=["x", "y", "z"], train={"balance": "global"})
    grid = _CountingGrid({1: [8, 2, 0], 2: [2, 2, 4], 3: None, 4: [1, 1]})
    assert take_class_census(grid, run, 1, min_sites=1) == FEDERATION
    with pytest.raises(ConfigError, match="no site answered the class census"):
        take_class_census(_CountingGrid({1: None}), run, 1, min_sites=1)
