"""Every error as ``{"error": {"code": ..., "message": ...}}`` with the right status.

Routes raise :class:`ApiError` (or one of its helpers); request validation failures name
the offending field (``body.price: ...``); unknown routes, wrong methods and database
constraint violations get the same shape. Nothing else leaks: an unexpected exception is
logged and answered with a bare 500.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from starlette.exceptions import HTTPException

__all__ = ["ApiError", "conflict", "describe_validation", "install_error_handlers", "not_found"]

logger = logging.getLogger(__name__)

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    422: "invalid_request",
}


class ApiError(Exception):
    """An error answered to the client as is."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def not_found(what: str, identifier: str) -> ApiError:
    """404 for an id the caller cannot see (missing, or another tenant's: the same)."""
    return ApiError(404, "not_found", f"no {what} {identifier!r}")


def conflict(message: str) -> ApiError:
    return ApiError(409, "conflict", message)


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def describe_validation(errors: Sequence[Any]) -> str:
    """``body.items.0.quantity: Input should be greater than 0; ...``."""
    parts = []
    for error in errors:
        location = ".".join(str(part) for part in error.get("loc", ()))
        parts.append(f"{location}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


async def _api_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ApiError)
    return error_response(error.status, error.code, error.message)


async def _validation_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    return error_response(422, "invalid_request", describe_validation(error.errors()))


async def _http_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    # Starlette's own errors: no route for the path, or not for this method.
    code = _CODES.get(error.status_code, "error")
    message = {404: "no such route", 405: "method not allowed on this route"}.get(
        error.status_code, str(error.detail)
    )
    response = error_response(error.status_code, code, message)
    if error.headers:
        response.headers.update(error.headers)
    return response


async def _integrity_error(_request: Request, error: Exception) -> JSONResponse:
    # Routes check what they can first; this is the race they cannot (a concurrent
    # write): the transaction was rolled back, nothing was written.
    logger.info("constraint violated: %s", error)
    return error_response(409, "conflict", "the change conflicts with the current data")


async def _unexpected(_request: Request, error: Exception) -> JSONResponse:
    logger.exception("unhandled error", exc_info=error)
    return error_response(500, "internal", "internal error")


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` in the service's JSON shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(IntegrityError, _integrity_error)
    app.add_exception_handler(Exception, _unexpected)
