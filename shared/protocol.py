"""Message keys the sites and the server share: what the server asks of a site, and what a reply may carry (errors included)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

INSTRUCTIONS_KEY = "instructions"
"""Config-record key of the round instructions (settings and learning-rate schedule) every message carries."""

VALIDATION_CONFUSION_KEY = "val-confusion-matrix"
"""Evaluation-reply key of a site's validation-split confusion counts (the server selects the best round by them)."""
VALIDATION_BALANCED_ACCURACY_KEY = "val-balanced-accuracy"
"""The balanced accuracy of the summed validation confusion counts, in the aggregated evaluation metrics."""
CALIBRATE_ACTION = "calibrate"
"""Query action: score the sent model's validation logits at the grid temperatures."""
CALIBRATE_MESSAGE = f"query.{CALIBRATE_ACTION}"
NEGATIVE_LOG_LIKELIHOODS_KEY = "val-nll-sums"
"""Calibration-reply key: summed negative log-likelihood of the site's validation images per grid temperature."""
PRIOR_ACTION = "prior"
"""Query action: sum the sent model's predicted probabilities per true class on the site's validation split."""
PRIOR_MESSAGE = f"query.{PRIOR_ACTION}"
SOFT_CONFUSION_KEY = "val-soft-confusion"
"""Prior-correction reply key: the summed validation probabilities per true class (classes x classes, row-major)."""
BATCH_NORM_ACTION = "batch_norm"
"""Query action: measure the sent model's BatchNorm statistics on the site's training images."""
BATCH_NORM_MESSAGE = f"query.{BATCH_NORM_ACTION}"
CLASS_COUNTS_ACTION = "class_counts"
"""Query action: count the site's training images per class (the server sums them for balance 'global')."""
CLASS_COUNTS_MESSAGE = f"query.{CLASS_COUNTS_ACTION}"
CLASS_COUNTS_KEY = "class-counts"
"""Class-count reply key: the site's training images per class, in the run's class order."""
HEAD_GRADIENT_ACTION = "head_gradient"
"""Query action: the class-balanced loss gradient of the sent classification layer over the site's training features."""
HEAD_GRADIENT_MESSAGE = f"query.{HEAD_GRADIENT_ACTION}"
HEAD_GRADIENT_RECORD = "head-gradient"
"""Head-refit reply array record: the summed gradient, named and shaped like the classification layer."""
HEAD_LOSS_KEY = "head-loss"
"""Head-refit reply key: the site's summed class-weighted cross-entropy of its training images at the sent layer."""
HEAD_IMAGE_WEIGHT_KEY = "head-image-weight"
"""Head-refit reply key: the site's summed per-image loss weights (the server normalises the summed gradient by it)."""
FINAL_REPORT_KEY = "final-report"
"""Config flag of the last evaluate message: evaluate, write the local report, reply with aggregates only."""
GAN_TRAIN_ACTION = "gan"
"""Train action: a few local GAN steps on the sent generator and discriminator."""
GAN_TRAIN_MESSAGE = f"train.{GAN_TRAIN_ACTION}"
GAN_SYNTHESISE_ACTION = "gan_synthesise"
"""Query action: synthesise and select the site's minority-class images with the sent GAN (they stay at the site)."""
GAN_SYNTHESISE_MESSAGE = f"query.{GAN_SYNTHESISE_ACTION}"
RUN_KEY = "run"
"""GAN-message config key of the run settings (JSON)."""
ROUND_KEY = "server-round"
QUALITY_KEY = "quality"
"""GAN-round config key: measure the Fréchet distance this round (runs without local DP only)."""
FEATURE_MODEL_KEY = "feature-model"
FEATURE_CLASSES_KEY = "feature-classes"
LEDGER_KEY = "privacy-ledger"
"""Train-config key naming the run whose privacy ledger a site continues (the run folder's name)."""
PRIVATE_SITES_KEY = "privacy-sites-recorded"
"""Train-config key: JSON list of the sites the coordinator's privacy records show trained privately in this run."""
SITE_RECORD_KEY = "site"
"""Reply config record naming the site (and, for training, the precision and device it used)."""

_PRIVATE_TRAINING_METRICS = frozenset({"epsilon", "epsilon-next-round", "delta", "noise-multiplier", "sample-rate", "dp-steps"})


@dataclass(frozen=True)
class ReplyAllowList:
    """What a site's reply to one message type may carry; anything else is refused at the site before it is sent.

    `metrics` may appear in any run; `non_private_metrics` only in runs without local DP (they
    summarise the real images outside the accounted budget); `private_metrics` only under local
    DP. Array records may only hold tensors named and shaped like the ones the message brought.
    """

    metrics: frozenset[str]
    list_metrics: frozenset[str] = frozenset()
    """Metrics that are lists of numbers (per class, per class pair, per temperature); all others are scalars."""
    non_private_metrics: frozenset[str] = frozenset()
    private_metrics: frozenset[str] = frozenset()
    site: frozenset[str] = frozenset({"name"})
    array_records: frozenset[str] = frozenset()

    def metric_keys(self, private: bool) -> frozenset[str]:
        """Every metric key a reply may carry in a run with (`private`) or without local DP."""
        return self.metrics | (self.private_metrics if private else self.non_private_metrics)

    def record_names(self) -> frozenset[str]:
        """The record names a reply may carry: its metrics, its site record and its array records."""
        return frozenset({"metrics", SITE_RECORD_KEY}) | self.array_records


_TRAINED_ON = frozenset({"name", "precision", "device"})
REPLY_ALLOW_LISTS: dict[str, ReplyAllowList] = {
    "train": ReplyAllowList(
        metrics=frozenset({"num-examples", "train-loss", "train-seconds", "images-per-second", "feedback-examples"}),
        private_metrics=_PRIVATE_TRAINING_METRICS,
        site=_TRAINED_ON,
        array_records=frozenset({"arrays"}),
    ),
    GAN_TRAIN_MESSAGE: ReplyAllowList(
        metrics=frozenset({"num-examples", "discriminator-loss", "generator-loss", "train-seconds"}),
        non_private_metrics=frozenset({"frechet-distance"}),
        private_metrics=_PRIVATE_TRAINING_METRICS | {"epsilon-next-classifier-round"},
        site=_TRAINED_ON,
        array_records=frozenset({"arrays"}),
    ),
    "evaluate": ReplyAllowList(
        metrics=frozenset({
            "num-examples", "loss", "accuracy", "balanced-accuracy", "macro-auc", "melanoma-sensitivity",
            "melanoma-specificity", "per-class-auc", "confusion-matrix", VALIDATION_CONFUSION_KEY,
        }),
        list_metrics=frozenset({"per-class-auc", "confusion-matrix", VALIDATION_CONFUSION_KEY}),
    ),
    CALIBRATE_MESSAGE: ReplyAllowList(
        metrics=frozenset({"num-examples", NEGATIVE_LOG_LIKELIHOODS_KEY}), list_metrics=frozenset({NEGATIVE_LOG_LIKELIHOODS_KEY})
    ),
    PRIOR_MESSAGE: ReplyAllowList(metrics=frozenset({"num-examples", SOFT_CONFUSION_KEY}), list_metrics=frozenset({SOFT_CONFUSION_KEY})),
    BATCH_NORM_MESSAGE: ReplyAllowList(metrics=frozenset({"num-examples"}), array_records=frozenset({"statistics"})),
    # Runs with local DP never ask for exact counts (their sampling must stay uniform).
    CLASS_COUNTS_MESSAGE: ReplyAllowList(
        metrics=frozenset({"num-examples"}),
        non_private_metrics=frozenset({CLASS_COUNTS_KEY}),
        list_metrics=frozenset({CLASS_COUNTS_KEY}),
    ),
    # Never asked in runs with local DP (the gradient is not accounted); the site refuses it there.
    HEAD_GRADIENT_MESSAGE: ReplyAllowList(
        metrics=frozenset({"num-examples"}),
        non_private_metrics=frozenset({HEAD_LOSS_KEY, HEAD_IMAGE_WEIGHT_KEY, VALIDATION_CONFUSION_KEY}),
        list_metrics=frozenset({VALIDATION_CONFUSION_KEY}),
        array_records=frozenset({HEAD_GRADIENT_RECORD}),
    ),
    # Synthesis sends totals only: per-class counts (real or added) and the nearest-neighbour
    # thresholds of the real images stay in the site's own selection report. The rejection counts
    # say how close generated images came to real ones, so they are not sent from a private run.
    GAN_SYNTHESISE_MESSAGE: ReplyAllowList(
        metrics=frozenset({"num-examples", "synthetic-images"}),
        non_private_metrics=frozenset({"candidates", "rejected-unrealistic", "rejected-memorised", "rejected-near-duplicate"}),
    ),
}
"""The allow-list of every message type a site answers; a type not listed here gets no reply but an error."""


@dataclass(frozen=True)
class SiteErrorCode:
    """A fixed error code a site replies with instead of an exception's text, and its generic message."""

    code: str
    message: str


SITE_ERRORS = {
    error.code: error
    for error in (
        SiteErrorCode("site-data", "the site could not read its images or label file"),
        SiteErrorCode("site-config", "the run's or the site's settings cannot be used at this site"),
        SiteErrorCode("site-model", "the site could not use the model it was sent"),
        SiteErrorCode("site-privacy-policy", "the run asks for more than the site's privacy policy allows"),
        SiteErrorCode("site-privacy-budget", "the round would take the site past the run's epsilon budget"),
        SiteErrorCode("site-privacy-ledger", "the site's privacy ledger of this run is missing or unreadable"),
        SiteErrorCode("site-out-of-memory", "the site ran out of memory"),
        SiteErrorCode("site-reply-refused", "the site's reply held something its allow-list does not permit, so none was sent"),
        SiteErrorCode("site-app-package", "the coordinator's app package differs from the skin-fl code installed at the site"),
        SiteErrorCode("site-internal", "the site hit an unexpected error"),
    )
}
"""Every error code a site may send; the full error text stays in the site's own log."""

_REFERENCE = re.compile(r"[0-9a-f]{12}")
_SITE_ERROR_REASON = re.compile(r"(site-[a-z-]+): .*; the site's log has the details under reference ([0-9a-f]{12})")


def site_error_reason(code: str, reference: str) -> str:
    """The whole text a site sends for an error: fixed code, generic message, local reference id."""
    if code not in SITE_ERRORS or not _REFERENCE.fullmatch(reference):
        raise ValueError(f"unknown site error code {code!r} or malformed reference {reference!r}")
    return f"{code}: {SITE_ERRORS[code].message}; the site's log has the details under reference {reference}"


@dataclass(frozen=True)
class ScreenedSiteError:
    """What the coordinator keeps of a site's error reply: a known code and reference, or that the text was dropped."""

    code: str
    reference: str | None = None
    reason: str = field(default="")

    @classmethod
    def of(cls, reason: str | None) -> ScreenedSiteError:
        """Screen an error reply's text: only a well-formed site error survives, anything else is replaced."""
        match = _SITE_ERROR_REASON.fullmatch(str(reason or ""))
        if match is not None and match.group(1) in SITE_ERRORS:
            return cls(match.group(1), match.group(2), site_error_reason(match.group(1), match.group(2)))
        return cls(
            "unrecognised",
            None,
            "the site replied with an error in an unrecognised form; its text is not kept (it may name site files); "
            "see the site's log",
        )


FLOWER_OBJECT_TRANSFER_ENV = {"FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES": "8", "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS": "8"}
"""Flower's object transfer settings for the coordinator's and the sites' processes: 8 objects at a time, not 2.

A message's weights travel as one object per tensor (165 for EfficientNet-Lite0). With Flower's
2 at a time, a site's SuperNode often asked for objects the server was still pushing and backed off
1, 2, 4, then 8 s: a refit query round on loopback took about 20 s; with 8 at a time, about 12 s.
"""
