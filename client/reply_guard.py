"""The site's gate around every handler: its privacy policy first, then only allow-listed replies, and errors as fixed codes."""

from __future__ import annotations

import logging
import secrets

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord
from flwr.common.constant import ErrorCode
from pydantic import ValidationError

from client.app_package import AppPackageMismatch
from shared.config import RoundInstructions, RunConfig
from shared.errors import ConfigError, DataError, ModelError, SkinFLError
from shared.privacy.accounting import PrivacyBudgetExceeded, PrivacyLedgerError
from shared.privacy.site_policy import PrivacyPolicyRefused, SitePrivacyPolicy
from shared.protocol import INSTRUCTIONS_KEY, REPLY_ALLOW_LISTS, RUN_KEY, SITE_RECORD_KEY, site_error_reason

logger = logging.getLogger(__name__)


class ReplyNotAllowed(SkinFLError):
    """A reply holds a record, key, value or tensor its message type's allow-list does not permit."""


def run_of_message(message: Message) -> RunConfig | None:
    """The run settings a message carries (classifier messages in their instructions, GAN messages as such), else None."""
    config = message.content.config_records.get("config", ConfigRecord())
    if INSTRUCTIONS_KEY in config:
        return RoundInstructions.model_validate_json(str(config[INSTRUCTIONS_KEY])).run
    if RUN_KEY in config:
        return RunConfig.model_validate_json(str(config[RUN_KEY]))
    return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_reply(message: Message, reply: Message, *, private: bool) -> None:
    """Raise ReplyNotAllowed unless `reply` holds only what its message type's allow-list permits.

    `private`: the run trains under local DP (or names no run): the stricter metric list applies.

    Metric keys must be listed (scalars, or lists of numbers where the list says so); the site
    record holds listed keys with short text; array records hold only tensors named and shaped
    like the ones the message brought (the model sent, never anything new).
    """
    message_type = message.metadata.message_type
    allowed = REPLY_ALLOW_LISTS.get(message_type)
    if allowed is None:
        raise ReplyNotAllowed(f"no allow-list for message type {message_type!r} in shared/protocol.py")
    extra_records = set(reply.content.keys()) - allowed.record_names()
    if extra_records:
        raise ReplyNotAllowed(f"{message_type} reply has records {sorted(extra_records)} outside its allow-list")
    metrics = reply.content.get("metrics")
    if not isinstance(metrics, MetricRecord):
        raise ReplyNotAllowed(f"{message_type} reply has no metric record 'metrics'")
    extra_metrics = set(metrics.keys()) - allowed.metric_keys(private)
    if extra_metrics:
        raise ReplyNotAllowed(f"{message_type} reply has metrics {sorted(extra_metrics)} outside its allow-list")
    for key, value in metrics.items():
        is_list = isinstance(value, list)
        if is_list != (key in allowed.list_metrics) or not all(_is_number(item) for item in (value if is_list else [value])):
            raise ReplyNotAllowed(f"{message_type} reply metric {key!r} is not the scalar or number list its allow-list says")
    site = reply.content.get(SITE_RECORD_KEY, ConfigRecord())
    if not isinstance(site, ConfigRecord) or set(site.keys()) - allowed.site:
        raise ReplyNotAllowed(f"{message_type} reply site record has keys outside {sorted(allowed.site)}")
    if not all(isinstance(value, str) and len(value) <= 200 for value in site.values()):
        raise ReplyNotAllowed(f"{message_type} reply site record values must be short text")
    received = message.content.array_records.get("arrays", ArrayRecord())
    for name in allowed.array_records & set(reply.content.keys()):
        record = reply.content[name]
        if not isinstance(record, ArrayRecord):
            raise ReplyNotAllowed(f"{message_type} reply record {name!r} is not an array record")
        for key, array in record.items():
            if key not in received or tuple(array.shape) != tuple(received[key].shape):
                raise ReplyNotAllowed(f"{message_type} reply tensor {key!r} is not one of the received model's tensors")


def site_error_code(error: BaseException) -> str:
    """The fixed code a site sends for `error` (see `shared.protocol.SITE_ERRORS`)."""
    if isinstance(error, ReplyNotAllowed):
        return "site-reply-refused"
    if isinstance(error, AppPackageMismatch):
        return "site-app-package"
    if isinstance(error, PrivacyPolicyRefused):
        return "site-privacy-policy"
    if isinstance(error, PrivacyBudgetExceeded):
        return "site-privacy-budget"
    if isinstance(error, PrivacyLedgerError):
        return "site-privacy-ledger"
    if isinstance(error, DataError):
        return "site-data"
    if isinstance(error, ModelError):
        return "site-model"
    if isinstance(error, (ConfigError, ValidationError)):
        return "site-config"
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return "site-out-of-memory"
    return "site-internal"


def error_reply(message: Message, error: BaseException) -> Message:
    """An error reply with only a fixed code, a generic message and a reference; the full text is logged here."""
    code = site_error_code(error)
    reference = secrets.token_hex(6)
    logger.error(
        "%s failed (%s, reference %s): %s", message.metadata.message_type, code, reference, error,
        exc_info=(type(error), error, error.__traceback__),
    )
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=site_error_reason(code, reference)), reply_to=message)


def guard_replies(message: Message, context: Context, call_next) -> Message:
    """Flower mod around every handler: a reply leaves the site only if its allow-list permits all of it.

    A failing handler, a run the site's privacy policy refuses, or a refused reply sends a fixed
    error code instead: Flower itself would send `str(exception)`, which names the site's files
    (hospital exports are often named by patient or record number).
    """
    try:
        # The site's own policy, before any of the run's steps (data loading included).
        policy = SitePrivacyPolicy.from_node_config(context.node_config)
        run = run_of_message(message)
        if run is None and policy != SitePrivacyPolicy():
            raise PrivacyPolicyRefused(f"{message.metadata.message_type} names no run settings, so the site's privacy policy cannot be checked")
        if run is not None:
            policy.check(run)
        reply = call_next(message, context)
        if reply.has_error():
            # An inner mod's error reply: its text is as unchecked as an exception's.
            raise RuntimeError(f"an inner mod replied with error {reply.error.code}: {reply.error.reason}")
        check_reply(message, reply, private=run is None or run.privacy.local)
    except Exception as error:  # noqa: BLE001 - every failure must become a fixed code
        return error_reply(message, error)
    return reply
