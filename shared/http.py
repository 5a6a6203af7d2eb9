"""HTTP pieces both services mount: body-size cap, request ids, bearer auth, Prometheus endpoint.

The body cap is a pure ASGI middleware: it answers 413 from ``Content-Length`` before reading, and
stops a chunked body as soon as it passes the cap, so a 50 MB upload is never read in full.
"""

from __future__ import annotations

import hmac
import json
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from shared.errors import Unauthorized
from shared.schemas import REQUEST_ID_HEADER

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def _send_json(
    send: Send, status: int, body: dict[str, Any], headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def _too_large(limit: int) -> dict[str, Any]:
    return {
        "error": {
            "code": "payload_too_large",
            "message": f"request body exceeds the limit of {limit} bytes",
            "limit_bytes": limit,
        }
    }


class BodyLimitMiddleware:
    """Reject request bodies over ``max_bytes`` with 413 before (or while) reading them."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_json(
                        send, 400, {"error": {"code": "invalid_input", "message": "bad Content-Length"}}
                    )
                    return
                if declared > self.max_bytes:
                    await _send_json(send, 413, _too_large(self.max_bytes))
                    return
        seen = 0
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _send_json(send, 413, _too_large(self.max_bytes))


class _BodyTooLarge(Exception):
    pass


class RequireJsonMiddleware:
    """Answer 415 to a POST/PUT/PATCH whose body is not declared ``application/json``."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = dict(scope.get("headers", []))
            ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            has_body = headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers
            if has_body and ctype != b"application/json":
                body = {
                    "error": {
                        "code": "unsupported_media_type",
                        "message": f"Content-Type must be application/json, got {ctype.decode('latin-1') or 'none'!r}",
                        "field": "Content-Type",
                    }
                }
                await _send_json(send, 415, body)
                return
        await self.app(scope, receive, send)


class RequestIdMiddleware:
    """Accept ``X-Request-Id`` (or mint one), store it on ``request.state``, echo it on the response."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                rid = value.decode("latin-1")[:128]
                break
        if not rid or not all(c.isalnum() or c in "-_.:" for c in rid):
            rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        header = (REQUEST_ID_HEADER.lower().encode(), rid.encode())

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != header[0]]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def request_id(request: Request) -> str:
    """The request id set by :class:`RequestIdMiddleware`."""
    return str(getattr(request.state, "request_id", "") or uuid.uuid4().hex)


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if any."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def check_bearer(request: Request, accepted: frozenset[str], what: str) -> None:
    """Raise :class:`Unauthorized` unless the bearer token is one of ``accepted`` (no-op when empty).

    Tokens are compared in constant time; a token in the query string is never accepted.
    """
    if not accepted:
        return
    token = bearer_token(request)
    if token is None:
        raise Unauthorized(f"missing {what}: send 'Authorization: Bearer <token>'")
    if not any(hmac.compare_digest(token.encode(), key.encode()) for key in accepted):
        raise Unauthorized(f"invalid {what}")


def metrics_response(registry: CollectorRegistry) -> Response:
    """Prometheus text exposition of ``registry``."""
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
