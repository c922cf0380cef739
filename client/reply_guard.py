"""The last step before a reply leaves a site: an exception becomes a fixed error code, its full text stays in the site's log."""

from __future__ import annotations

import logging
import secrets

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode
from pydantic import ValidationError

from shared.errors import ConfigError, DataError, ModelError
from shared.protocol import site_error_reason

logger = logging.getLogger(__name__)


def site_error_code(error: BaseException) -> str:
    """The fixed code a site sends for `error` (see `shared.protocol.SITE_ERRORS`)."""
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
    """Flower mod around every handler: nothing but a fixed error code leaves the site when a handler fails.

    Flower itself would send `str(exception)`, which names the site's files (hospital exports
    are often named by patient or record number).
    """
    try:
        reply = call_next(message, context)
    except Exception as error:  # noqa: BLE001 - every failure must become a fixed code
        return error_reply(message, error)
    if reply.has_error():
        # An inner mod's error reply: its text is as unchecked as an exception's.
        return error_reply(message, RuntimeError(f"an inner mod replied with error {reply.error.code}: {reply.error.reason}"))
    return reply
