"""The web app's errors: one JSON format for every error answer, raised as ApiError or caught by the app's handlers."""

import logging
import secrets

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)
UNAUTHORISED_MESSAGE = "sign in with a valid access token (Authorization: Bearer <token>); ask IT for one"


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    """The JSON answer {"error": {"code", "message"}} every error of the web app gets."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class ApiError(HTTPException):
    """An HTTP error with a code and a message that says what to do."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code


def install_error_handlers(app: FastAPI) -> None:
    """Every error, expected or not, answers in the JSON error format; an unexpected one is logged under a reference."""

    @app.exception_handler(StarletteHTTPException)
    async def httperror_response(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = getattr(error, "code", None) or {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        message = str(error.detail)
        if error.status_code == 404 and code == "not_found" and message == "Not Found":
            message = f"there is no {request.url.path}; see /api/docs for the endpoints"
        return error_response(error.status_code, code, message, getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validationerror_response(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc'] if part != 'body') or 'request'}: {problem['msg']}"
            for problem in error.errors()
        )
        return error_response(422, "invalid_request", f"the request is not valid ({problems}); see /api/docs")

    @app.exception_handler(Exception)
    async def unexpectederror_response(request: Request, error: Exception) -> JSONResponse:
        reference = secrets.token_hex(6)
        logger.error("%s %s failed (reference %s)", request.method, request.url.path, reference, exc_info=error)
        return error_response(
            500, "internal_error",
            f"the web app hit an unexpected error; nothing was kept from this request. Tell IT the reference {reference} "
            "(the service log has the details)",
        )
