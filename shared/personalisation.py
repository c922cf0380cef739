"""A site's personalised model: the global model fine-tuned on the site's own training split."""

from __future__ import annotations

import copy

import torch
from torch import nn

from shared.config import RunConfig
from shared.data.cache import CachedImages
from shared.local_training import precision_for, train_on_images


def personalise(model: nn.Module, train_images: CachedImages, run: RunConfig, *, device: torch.device, seed: int) -> nn.Module:
    """A fine-tuned copy of `model` after `run.report.personalise_epochs` passes over a site's training images.

    The rate falls on a cosine from `personalise_learning_rate` to the run's floor ratio of it, so the
    copy stays close to the global model it starts from; `model` itself is left unchanged.
    The site's own recipe applies otherwise (loss, augmentation, batch size); a run balanced over
    the federation's classes balances the site's own here, since the copy serves that site alone.
    """
    epochs = run.report.personalise_epochs
    if epochs <= 0:
        raise ValueError("personalise_epochs is 0; set report.personalise_epochs to a share or count of passes")
    if len(train_images) == 0:
        raise ValueError("the site has no training images to personalise on; give the site images or turn personalisation off")
    personalised = copy.deepcopy(model)
    config = run.train.model_copy(
        update={
            "local_epochs": epochs,
            "local_steps": None,
            "proximal_mu": 0.0,
            "max_steps_per_epoch": None,
            "balance": "sampler" if run.train.balance == "global" else run.train.balance,
        }
    )
    start = run.report.personalise_learning_rate
    train_on_images(
        personalised,
        train_images,
        config=config,
        device=device,
        precision=precision_for(personalised, config, device, run.preprocess.image_size),
        learning_rate_start=start,
        learning_rate_end=start * run.train.min_learning_rate_ratio,
        seed=seed,
        description="personalise",
    )
    return personalised.eval()
