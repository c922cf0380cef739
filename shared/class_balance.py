"""Class balance over the whole federation, at one site: sampling weights, a site's share of a balanced epoch.

Pooled training with a class-balanced sampler minimises the mean over classes of each class's
mean loss. Written per site, that objective weighs an image of class c by 1 / N_c, N_c being the
*federation's* training images of class c, and a site by the sum of its images' weights. So a
site that samples its images with probability proportional to 1 / N_c, draws its share of a
balanced pooled epoch per pass, and counts by that share in the average, trains the pooled
objective; one local step per round is exactly pooled SGD. A site's own class-balanced sampler
instead repeats its few rare images as often as its common ones (a site with 2 images of a
class draws them in 1/6 of its batches) and a site of one class counts by its size alone.
"""

from __future__ import annotations

import numpy as np
import torch

from shared.errors import ConfigError


def require_federation_counts(federation_counts: list[int] | None) -> list[int]:
    """The federation's class counts, or a clear error where balance 'global' has none."""
    if federation_counts is None:
        raise ConfigError(
            "balance 'global' needs the federation's class counts, which the server sends with every round; "
            "outside a federation use balance 'sampler'"
        )
    return federation_counts


def counts_seen_by_site(site_counts: np.ndarray | list[int], federation_counts: np.ndarray | list[int]) -> np.ndarray:
    """The federation's training images per class, never fewer than the site's own (a site missed by the count)."""
    site = np.asarray(site_counts, dtype=np.float64)
    federation = np.asarray(federation_counts, dtype=np.float64)
    if site.shape != federation.shape:
        raise ConfigError(
            f"the federation's class counts name {federation.size} classes and the site's {site.size}; "
            "the server and the sites must use the same class list"
        )
    return np.maximum(site, federation)


def federation_balanced_weights(labels: np.ndarray, federation_counts: np.ndarray | list[int]) -> torch.Tensor:
    """Sampling weight of every image: one over the federation's training images of its class."""
    labels = np.asarray(labels, dtype=np.int64)
    site_counts = np.bincount(labels, minlength=len(federation_counts))
    counts = counts_seen_by_site(site_counts, federation_counts)
    return torch.from_numpy(1.0 / counts[labels]).to(torch.float64)


def balanced_class_draws(site_counts: np.ndarray | list[int], federation_counts: np.ndarray | list[int]) -> np.ndarray:
    """Images of each class a site draws in one pass: its share of one class-balanced pass over the federation's images.

    A balanced pooled pass draws N images, each class (of K with images) N / K times; the site
    holds the fraction n_c / N_c of class c, so it draws N / K * n_c / N_c of them.
    """
    site = np.asarray(site_counts, dtype=np.float64)
    counts = counts_seen_by_site(site, federation_counts)
    present = counts > 0
    if not present.any():
        raise ConfigError("the federation's class counts hold no images; the sites' training splits are empty")
    fractions = np.divide(site, counts, out=np.zeros_like(site), where=present)
    return counts.sum() / present.sum() * fractions


def balanced_epoch_share(site_counts: np.ndarray | list[int], federation_counts: np.ndarray | list[int]) -> float:
    """Images a site draws in one pass under balance 'global' (all classes of `balanced_class_draws`)."""
    return float(balanced_class_draws(site_counts, federation_counts).sum())
