"""The one uvicorn configuration every mole server runs with, and the HTTP/1.1 protocol that guards it.

``serve`` is what ``mole worker``, ``mole coordinator`` (monolithic mode included) and the tests'
in-thread servers call. uvicorn's default protocol (httptools) has no limit on the size or number
of request headers (httptools grows a header value by concatenation, so one huge header costs time
quadratic in its size, on the event loop) and no timeout while headers or a body arrive (the
keep-alive timer is reset by every byte). :class:`GuardedHttpProtocol` adds them where the bytes
arrive, before anything is parsed:

- header bytes (request line included) over ``max_header_bytes`` or more than ``max_headers``
  header fields: 431 and the connection closes;
- headers not complete within ``header_timeout_s`` of a request's first byte (or of the
  connection's opening): 408 and close; a body not complete within ``body_timeout_s`` of its
  headers: 408 (when no response has started) and close, which the app sees as a disconnect;
- more than ``max_connections`` open connections: a new one is closed at once.

Servers mole does not start (Modal's) get :class:`~shared.http.HeaderLimitMiddleware`, the same
header limits checked on the parsed request.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from shared.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    """What one connection may cost the server (from :class:`Settings`)."""

    max_header_bytes: int = 65536  # request line + header fields of one request
    max_headers: int = 100  # header fields of one request
    header_timeout_s: float = 10.0  # from a request's first byte to the end of its headers
    body_timeout_s: float = 60.0  # from the end of the headers to the end of the body
    max_connections: int = 1024  # open connections; more are closed on arrival

    @classmethod
    def of(cls, settings: Settings) -> ServerLimits:
        return cls(
            max_header_bytes=settings.max_header_bytes,
            max_headers=settings.max_headers,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            max_connections=settings.max_connections,
        )


_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
LINGER_S = 2.0  # after a refusal, what the client still sends is read and dropped this long, then closed


class _HeaderLimit(Exception):
    """Raised from the parser's header callback; the parser turns it into a parse error."""


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header limits and read timeouts (see the module docstring).

    ``limits`` is set on the subclass :func:`protocol_for` makes.
    """

    limits: ServerLimits = ServerLimits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_bytes = 0
        self._header_count = 0
        self._refusal: tuple[int, str, str] | None = None  # set when a limit is hit inside the parser
        self._in_headers = True
        self._headers_ended = False
        self._discarding = False  # refused: the rest of what arrives is dropped until the close
        self._read_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.limits.max_connections:
            logger.warning("connection refused: %d connections open", len(self.connections) - 1)
            transport.close()
            return
        self._arm(self.limits.header_timeout_s, "headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # ---- timers ------------------------------------------------------------------------------
    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(seconds, self._read_timed_out, what)

    def _disarm(self) -> None:
        if getattr(self, "_read_timer", None) is not None:
            self._read_timer.cancel()  # type: ignore[union-attr]
            self._read_timer = None

    def _read_timed_out(self, what: str) -> None:
        self._read_timer = None
        if self._discarding or self.transport.is_closing():
            return
        limit = self.limits.header_timeout_s if what == "headers" else self.limits.body_timeout_s
        message = f"the request {what} did not arrive within {limit:g} s"
        cycle = self.cycle
        if what == "headers" and self._header_bytes == 0 and (cycle is None or cycle.response_complete):
            self.transport.close()  # an idle connection: nothing to answer
        elif cycle is None or cycle.response_complete or not cycle.response_started:
            self._refuse(408, "request_timeout", message)
        else:
            self.transport.close()

    # ---- limits ------------------------------------------------------------------------------
    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` with mole's JSON error body and close the connection.

        The close lingers: our side is shut for writing and what the client still sends is dropped
        for ``LINGER_S`` (closing with unread data would reset the connection, and the client could
        lose the answer before reading it).
        """
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        head = (
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, _REASONS[status], len(body))
        )
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app must not write after us
            self.cycle.message_event.set()
        self.transport.write(head + body)
        self._disarm()
        self._discarding = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()

    def _too_large(self) -> None:
        self._refuse(
            431,
            "headers_too_large",
            f"request headers exceed the limit of {self.limits.max_header_bytes} bytes "
            f"or {self.limits.max_headers} fields",
        )

    def data_received(self, data: bytes) -> None:
        if self._discarding or self.transport.is_closing():
            return
        if self._in_headers:
            if self._read_timer is None:
                self._arm(self.limits.header_timeout_s, "headers")
            room = self.limits.max_header_bytes - self._header_bytes
            if len(data) > room:
                head, data = data[: max(room, 0)], data[max(room, 0) :]
                self._header_bytes += len(head)
                self._headers_ended = False
                if head:
                    super().data_received(head)
                if self.transport.is_closing():
                    return
                if not self._headers_ended:
                    self._too_large()
                    return
            else:
                self._header_bytes += len(data)
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        if self._refusal is not None:  # a limit hit inside a parser callback
            self._refuse(*self._refusal)
            return
        super().send_400_response(msg)

    # ---- parser callbacks --------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._header_count = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._refusal = (
                431,
                "headers_too_large",
                f"request has more than {self.limits.max_headers} header fields",
            )
            raise _HeaderLimit
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._headers_ended = True
        self._header_bytes = 0
        self._arm(self.limits.body_timeout_s, "body")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_headers = True  # what arrives next is the next request's headers, timed from its first byte
        self._header_bytes = 0
        super().on_message_complete()


def protocol_for(limits: ServerLimits) -> type[GuardedHttpProtocol]:
    """A :class:`GuardedHttpProtocol` subclass bound to ``limits`` (uvicorn instantiates it)."""
    return type("MoleHttpProtocol", (GuardedHttpProtocol,), {"limits": limits})


def server_config(app: Any, settings: Settings, host: str, port: int, **overrides: Any) -> uvicorn.Config:
    """The uvicorn config of every mole server: guarded protocol, no access log, graceful drain.

    uvicorn stops accepting on SIGTERM/SIGINT and waits for in-flight requests up to the drain
    timeout before running the app's shutdown (which drains the batcher).
    """
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "http": protocol_for(ServerLimits.of(settings)),
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": int(settings.drain_timeout_s),
        **overrides,
    }
    return uvicorn.Config(app, **options)


def serve(app: Any, settings: Settings, host: str, port: int) -> None:
    """Run ``app`` until SIGTERM/SIGINT with :func:`server_config`."""
    uvicorn.Server(server_config(app, settings, host, port)).run()
