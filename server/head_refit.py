"""Federated refit of the handed-on model's top (last stage or classification layer): the server steps, the sites send summed gradients."""

from __future__ import annotations

import logging
import time

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp import Grid
from torch import nn

from server.checkpoint import array_record_to_numpy
from server.class_census import take_class_census
from server.site_queries import ask_sites
from shared.config import RunConfig
from shared.errors import ConfigError
from shared.head_refit import SiteAnswer, SummedAnswers, sum_answers
from shared.models.model_cut import cut_model
from shared.protocol import HEAD_GRADIENT_MESSAGE, HEAD_GRADIENT_RECORD, HEAD_IMAGE_WEIGHT_KEY, HEAD_LOSS_KEY, VALIDATION_CONFUSION_KEY
from shared.top_refit import refit_layers

logger = logging.getLogger(__name__)


class _NoSiteAnswered(Exception):
    """A refit step got no usable answer."""


def refit_handed_on_layers(grid: Grid, run: RunConfig, arrays: ArrayRecord, model: nn.Module) -> tuple[ArrayRecord, dict | None]:
    """The arrays with the refitted top (`run.federation.refit_layers`), and what the refit did (None when no site could answer).

    First the class census (the loss weighs every class equally over the federation), then
    `run.head_refit_steps()` + 1 queries of the sites (about that many for the classification layer's
    L-BFGS): shared.top_refit, shared.head_refit.
    """
    layers = run.federation.refit_layers
    names = cut_model(model, layers).trained_names
    base = array_record_to_numpy(arrays)
    num_classes = len(run.classes)
    server_round = run.federation.rounds
    try:
        counts = take_class_census(grid, run, server_round=server_round, min_sites=1)
    except ConfigError:
        logger.warning("refit: no site answered the class census; the model stays as trained")
        return arrays, None
    answered: list[int] = []

    def sums_at(values: dict[str, np.ndarray]) -> SummedAnswers:
        current = ArrayRecord({name: Array(value) for name, value in {**base, **values}.items()})
        answers = ask_sites(
            grid, run, HEAD_GRADIENT_MESSAGE, server_round=server_round, purpose="refit", arrays=current,
            federation_class_counts=counts,
        )
        usable = []
        for answer in answers:
            gradient = array_record_to_numpy(answer.content[HEAD_GRADIENT_RECORD])
            confusion = list(answer.metrics[VALIDATION_CONFUSION_KEY])
            shapes = {name: value.shape for name, value in gradient.items()}
            if shapes != {name: base[name].shape for name in names} or len(confusion) != num_classes**2:
                logger.warning("refit: node %s sent a gradient or confusion of the wrong shape; left out", answer.node)
                continue
            usable.append(
                SiteAnswer(float(answer.metrics[HEAD_LOSS_KEY]), gradient, float(answer.metrics[HEAD_IMAGE_WEIGHT_KEY]), confusion)
            )
        summed = sum_answers(usable, names, num_classes)
        if summed.summed_image_weight <= 0:
            raise _NoSiteAnswered
        answered.append(len(usable))
        return summed

    if not any(counts):
        logger.warning("refit: the sites hold no training images of the run's classes; the model stays as trained")
        return arrays, None
    started = time.monotonic()
    try:
        result = refit_layers(layers, model, base, sums_at, steps=run.head_refit_steps())
    except _NoSiteAnswered:
        logger.warning("refit: no site sent a usable gradient at query %d; the model stays as trained", len(answered) + 1)
        return arrays, None
    what = "the last stage" if layers == "last-stage" else "the classification layer"
    refitted, scores = result.refitted, result.validation_balanced_accuracy
    if refitted:
        logger.info(
            "skin-fl refitted %s over the sites' training images in %d queries, %.0f s (validation balanced accuracy "
            "%s -> %s, %d site(s))",
            what, len(scores), time.monotonic() - started, _figure(scores[0]), _figure(scores[-1]), min(answered),
        )
    else:
        logger.info(
            "skin-fl kept %s as trained: its refit (%d queries, %.0f s) scored %s on the sites' validation images, below "
            "the trained model's %s",
            what, len(scores), time.monotonic() - started, _figure(scores[-1]), _figure(scores[0]),
        )
    handed_on = {**base, **result.layers}
    return ArrayRecord({name: Array(value) for name, value in handed_on.items()}), {
        "refitted": refitted,
        "layers": layers,
        "validation_balanced_accuracy": scores,
    }


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
