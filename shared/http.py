"""HTTP pieces both services mount: body-size cap, request ids, bearer auth, Prometheus endpoint.

The body cap is a pure ASGI middleware: it answers 413 from ``Content-Length`` before reading, and
stops a chunked body as soon as it passes the cap, so a 50 MB upload is never read in full.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from fastapi import FastAPI, Request
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
    """Reject request bodies over ``max_bytes`` with 413 before (or while) reading them.

    A declared ``Content-Length`` over the cap is refused before reading. A chunked body is counted
    as it arrives: past the cap this middleware answers 413 itself and hands the app a disconnect,
    so whatever the app makes of the truncated body (FastAPI: "error parsing the body") is dropped.
    """

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
        refused = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen, started, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    refused = True
                    if not started:
                        started = True
                        await _send_json(send, 413, _too_large(self.max_bytes))
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if refused:
                return  # the 413 is the answer
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, limited_receive, tracking_send)


class HeaderLimitMiddleware:
    """431 for a request with more than ``max_headers`` header fields or ``max_bytes`` of them.

    mole's own servers refuse such requests while reading them (:mod:`shared.server`); this is the
    same limit for servers mole does not configure (Modal's), checked on the parsed request.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, max_headers: int):
        self.app = app
        self.max_bytes = max_bytes
        self.max_headers = max_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope.get("headers", [])
            size = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b""))
            size += sum(len(k) + len(v) + 4 for k, v in headers)
            if len(headers) > self.max_headers or size > self.max_bytes:
                body = {
                    "error": {
                        "code": "headers_too_large",
                        "message": f"request headers exceed the limit of {self.max_bytes} bytes "
                        f"or {self.max_headers} fields",
                    }
                }
                await _send_json(send, 431, body)
                return
        await self.app(scope, receive, send)


class CancelOnDisconnectMiddleware:
    """Cancel the handling of a request whose client has gone before the response is complete.

    Once the app has read the whole body, a watcher waits for ``http.disconnect``; when it comes
    first, the app's task is cancelled (a coordinator's call to a worker is closed, a worker's
    queued row is dropped, a running generation stops) and ``on_cancel()`` counts it. Later
    ``receive()`` calls of the app get the same disconnect message.
    """

    def __init__(self, app: ASGIApp, on_cancel: Callable[[Scope], None] | None = None):
        self.app = app
        self.on_cancel = on_cancel

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_read = asyncio.Event()
        after_body: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        completed = False

        async def watched_receive() -> dict[str, Any]:
            if body_read.is_set():
                return await asyncio.shield(after_body)
            message = await receive()
            if message["type"] == "http.disconnect":
                body_read.set()
                if not after_body.done():
                    after_body.set_result(message)
            elif not message.get("more_body", False):
                body_read.set()
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal completed
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                completed = True

        app_task = asyncio.ensure_future(self.app(scope, watched_receive, tracking_send))

        async def watch() -> None:
            await body_read.wait()
            if not after_body.done():
                after_body.set_result(await receive())
            if after_body.result()["type"] == "http.disconnect" and not completed and not app_task.done():
                app_task.cancel()
                if self.on_cancel is not None:
                    self.on_cancel(scope)

        watcher = asyncio.ensure_future(watch())
        try:
            await app_task
        except asyncio.CancelledError:
            if not app_task.cancelled() or asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise  # we were cancelled ourselves, not by the watcher
        finally:
            watcher.cancel()
            if not app_task.done():
                app_task.cancel()


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
        # ASCII only: the id is forwarded to workers in a header, and logged
        if not rid or not all(c.isascii() and (c.isalnum() or c in "-_.:") for c in rid):
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


def install_docs(app: FastAPI, dependency: Any) -> None:
    """``/openapi.json``, ``/docs`` and ``/redoc`` behind ``dependency`` (the app is built with
    them off): with credentials configured, the API's description is not public."""
    from fastapi import APIRouter
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
    from fastapi.responses import HTMLResponse, JSONResponse

    docs = APIRouter(dependencies=[dependency], include_in_schema=False)

    @docs.get("/openapi.json")
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @docs.get("/docs")
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    @docs.get("/redoc")
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")

    app.include_router(docs)


def metrics_response(registry: CollectorRegistry) -> Response:
    """Prometheus text exposition of ``registry``."""
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
