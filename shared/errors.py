"""Typed errors and the one place that maps them to HTTP responses.

Every error body has the same shape: ``{"error": {"code": str, "message": str, ...details}}``.
Services raise a :class:`MoleError` subclass; :func:`install_error_handlers` turns it into JSON
with the class's ``status``. Nothing classifies errors by matching exception text.
"""

from __future__ import annotations

import logging
import math
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.schemas import REQUEST_ID_HEADER

logger = logging.getLogger(__name__)


class MoleError(Exception):
    """Base of every error a mole service answers with; ``status``/``code`` pick the HTTP reply.

    ``details`` must be JSON-safe: they are merged into the error body next to code and message.
    Subclasses set ``status`` and ``code`` as class attributes; :class:`ForwardedError` sets them
    per instance (the worker's).
    """

    status: int = 500
    code: str = "mole_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details

    def to_body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {"code", "message", **details}}``."""
        return {"error": {"code": self.code, "message": self.message, **self.details}}


class InvalidInput(MoleError):
    """The request is malformed; the message names the field and the limit."""

    status = 400
    code = "invalid_input"


class UnprocessableRequest(MoleError):
    """The model failed on this request while it still serves a known-good one: the request's own
    content is the cause (a client error; never counted against the worker's health)."""

    status = 422
    code = "unprocessable_request"


class PayloadTooLarge(MoleError):
    """A body, image or prompt exceeds a configured size limit."""

    status = 413
    code = "payload_too_large"


class Unauthorized(MoleError):
    """Missing or wrong credentials (API key or worker token)."""

    status = 401
    code = "unauthorized"


class AdapterNotFound(MoleError):
    """The named adapter/expert is unknown here; details list what is known."""

    status = 404
    code = "adapter_not_found"


class NotReady(MoleError):
    """The service is still loading or is draining."""

    status = 503
    code = "not_ready"


class Overloaded(MoleError):
    """The admission queue is full; the client should retry after ``retry_after`` seconds."""

    status = 429
    code = "overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0, **details: Any) -> None:
        super().__init__(message, retry_after=retry_after, **details)
        self.retry_after = retry_after


class NoWorkerAvailable(MoleError):
    """No ready worker replica can serve the adapter."""

    status = 503
    code = "no_worker_available"


class RouterUnavailable(MoleError):
    """The vLLM worker that serves the router (``router.served_by``) failed or did not answer in time."""

    status = 503
    code = "router_unavailable"


class WorkerTimeout(MoleError):
    """A worker did not answer within the request timeout."""

    status = 504
    code = "worker_timeout"


class WorkerError(MoleError):
    """A worker answered with an error or an unreadable response."""

    status = 502
    code = "worker_error"


class NoConfidentRoute(MoleError):
    """The router's top label is below its threshold and no fallback adapter is configured."""

    status = 422
    code = "no_confident_route"


class GenerationFailed(MoleError):
    """The model forward/generate failed for this request."""

    status = 500
    code = "generation_failed"


class ForwardedError(MoleError):
    """A worker's own error answer that is the client's answer (e.g. 404 for an adapter it does not
    hold): passed on with the worker's status, code, message and details."""

    def __init__(self, worker_id: str, status: int, code: str, message: str, **details: Any) -> None:
        super().__init__(message, **details)
        self.worker_id = worker_id
        self.status = status
        self.code = code


class ConfigError(MoleError):
    """The mapping or settings are invalid; the message names the offending entry."""

    status = 500
    code = "config_error"


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))


def _request_id(request: Request) -> str:
    rid = getattr(request.state, "request_id", None) or request.headers.get(REQUEST_ID_HEADER)
    return str(rid) if rid else uuid.uuid4().hex


_JSON_SCALARS = (str, int, float, bool, type(None))


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """Pydantic errors as ``{"field", "message", "type"[, "ctx"]}``, never echoing the input value."""
    out: list[dict[str, Any]] = []
    for err in exc.errors():
        item: dict[str, Any] = {
            "field": ".".join(str(part) for part in err.get("loc", ())),
            "message": str(err.get("msg", "invalid value")),
            "type": str(err.get("type", "value_error")),
        }
        ctx = err.get("ctx")
        if isinstance(ctx, dict):
            # Only scalar limits (max_length, ge, pattern...) are kept; exception objects are not JSON.
            safe = {k: v for k, v in ctx.items() if isinstance(v, _JSON_SCALARS) and k != "error"}
            if safe:
                item["ctx"] = safe
        out.append(item)
    return out


async def _mole_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, MoleError)
    headers: dict[str, str] = {}
    retry_after = getattr(exc, "retry_after", None)
    if isinstance(retry_after, int | float):
        headers["Retry-After"] = retry_after_header(float(retry_after))
    return JSONResponse(exc.to_body(), status_code=exc.status, headers=headers)


async def _validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = _validation_errors(exc)
    message = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request"
    body = {"error": {"code": "invalid_request", "message": message, "errors": errors}}
    return JSONResponse(body, status_code=422)


async def _http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else "http error"
    body = {"error": {"code": f"http_{exc.status_code}", "message": message}}
    return JSONResponse(body, status_code=exc.status_code, headers=dict(exc.headers or {}))


async def _unhandled_error_handler(request: Request, exc: Exception) -> JSONResponse:
    rid = _request_id(request)
    logger.error(
        "unhandled error on %s %s",
        request.method,
        request.url.path,
        exc_info=(type(exc), exc, exc.__traceback__),
        extra={"request_id": rid},
    )
    body = {"error": {"code": "internal_error", "message": "internal error", "request_id": rid}}
    return JSONResponse(body, status_code=500, headers={REQUEST_ID_HEADER: rid})


def install_error_handlers(app: FastAPI) -> None:
    """Register the handler table on ``app``: MoleError, request validation, HTTPException, anything.

    The catch-all answers 500 with only a request id; the traceback goes to the log, never the client.
    """
    app.add_exception_handler(MoleError, _mole_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
    app.add_exception_handler(Exception, _unhandled_error_handler)
