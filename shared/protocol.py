"""Message keys the sites and the server share: what a site reports, what the server asks of it, and its error replies."""

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
BATCH_NORM_ACTION = "batch_norm"
"""Query action: measure the sent model's BatchNorm statistics on the site's training images."""
BATCH_NORM_MESSAGE = f"query.{BATCH_NORM_ACTION}"
GAN_TRAIN_ACTION = "gan"
"""Train action: a few local GAN steps on the sent generator and discriminator."""
GAN_TRAIN_MESSAGE = f"train.{GAN_TRAIN_ACTION}"
GAN_SYNTHESISE_ACTION = "gan_synthesise"
"""Query action: synthesise and select the site's minority-class images with the sent GAN (they stay at the site)."""
GAN_SYNTHESISE_MESSAGE = f"query.{GAN_SYNTHESISE_ACTION}"
SITE_RECORD_KEY = "site"
"""Reply config record naming the site (and, for training, the precision and device it used)."""

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
        SiteErrorCode("site-out-of-memory", "the site ran out of memory"),
        SiteErrorCode("site-reply-refused", "the site's reply held something its allow-list does not permit, so none was sent"),
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
