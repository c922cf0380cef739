"""The web app's ASGI middleware: the token checked before a body is read, bodies capped, security headers on every answer."""

from collections.abc import Callable

from client.web.errors import UNAUTHORISED_MESSAGE, error_response

SECURITY_HEADERS = {
    # Everything the pages load comes from this server; nothing may be fetched from or sent elsewhere.
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
        "font-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}


class _BodyTooLarge(Exception):
    pass


BODY_METHODS = (b"POST", b"PUT", b"PATCH")


class RequestLimits:
    """ASGI middleware: the token of a request with a body checked before the body is read, bodies capped
    (declared or streamed), and security headers on every answer."""

    def __init__(self, app, max_body_bytes: int, token_is_valid: Callable[[str], bool]) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.token_is_valid = token_is_valid

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        started = False
        exceeded = False

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                extra = [(name.encode(), value.encode()) for name, value in SECURITY_HEADERS.items()]
                if scope["path"].startswith("/api/"):
                    extra.append((b"cache-control", b"no-store"))
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        too_large = error_response(
            413, "request_too_large",
            f"the request is larger than {self.max_body_bytes / 2**20:.0f} MiB; send fewer or smaller images per request",
        )
        replaced = False

        async def send_or_refuse(message):
            # Once the body ran over the limit, whatever the app answers (its body parser turns the
            # interruption into a generic 400) is replaced by the 413 that says what to do.
            nonlocal replaced
            if not exceeded:
                await send_with_headers(message)
            elif not replaced and message["type"] == "http.response.start":
                replaced = True
                await too_large(scope, receive, send_with_headers)

        if scope["path"].startswith("/api/") and scope["method"].encode() in BODY_METHODS:
            # Up to hundreds of MiB of multipart body would be parsed before the endpoint's own token check.
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not token or not self.token_is_valid(token):
                await error_response(401, "unauthorised", UNAUTHORISED_MESSAGE, {"WWW-Authenticate": "Bearer"})(scope, receive, send_with_headers)
                return
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_body_bytes:
                    await too_large(scope, receive, send_with_headers)
                    return
            except ValueError:
                await error_response(400, "bad_request", "the Content-Length header is not a number")(scope, receive, send_with_headers)
                return
        received = 0

        async def limited_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    exceeded = True
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send_or_refuse)
        except _BodyTooLarge:
            if not started:
                await too_large(scope, receive, send_with_headers)
