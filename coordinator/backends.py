"""Backends: the one contract between the dispatcher and whatever runs a request.

A :class:`Backend` is one worker: ``worker_id``, ``infer``, ``stream`` and ``health``. :class:`HttpBackend`
reaches a worker process over the app's shared ``httpx.AsyncClient``; monolithic mode's
``InProcessBackend`` (:mod:`mole.monolithic`) calls a worker service of the same process. A new
engine is a new class with these four members; the dispatcher does not change.

Every backend reads a worker's answer through :func:`read_answer`, the one table from a status (and
the error body) to an outcome:

- 200 with a valid body: the answer;
- 429, 500, 502, 503, 504, 401/403 (our token is wrong for that worker), 404 (the worker does not
  hold the adapter the mapping assigns to it: out of step with the mapping, e.g. after a failed hot
  load), an unreadable body: an :class:`AttemptFailed` with a :class:`Failure` reason; the request
  did not run to an answer and another replica may try;
- any other status: the client's answer, raised as :class:`~shared.errors.ForwardedError` with the
  worker's status, code, message and details.

A call that outlives its timeout is :class:`AttemptTimedOut` (never retried: the budget is spent).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import httpx
from pydantic import ValidationError

from shared.errors import ForwardedError, MoleError
from shared.mapping import WorkerSpec
from shared.schemas import (
    DEADLINE_HEADER,
    REQUEST_ID_HEADER,
    AdapterInfo,
    InferRequest,
    InferResponse,
    InferStreamEvent,
    WorkerReady,
)

PROBE_TIMEOUT_S = 5.0  # a health probe slower than this counts as down
WorkerState = Literal["unknown", "up", "loading", "draining", "failed", "down"]
_CODE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")  # a worker's error code passed on (metric label safe)


class Failure(enum.StrEnum):
    """Why one attempt produced no answer; the values appear in ``routing_path`` and error details."""

    CONNECT_ERROR = "connect_error"  # nothing listens: the worker is down
    CONNECT_TIMEOUT = "connect_timeout"
    READ_ERROR = "read_error"  # the connection broke before an answer
    TRANSPORT_ERROR = "transport_error"
    OVERLOADED = "overloaded"  # 429: the worker's queue is full
    HTTP_500 = "http_500"  # the worker broke on this request
    HTTP_502 = "http_502"
    HTTP_503 = "http_503"  # loading, draining or failed
    HTTP_504 = "http_504"
    BAD_RESPONSE = "bad_response"  # a 200 whose body is not an answer
    WORKER_AUTH = "worker_auth"  # our worker token was refused: an operator's fault, not the client's
    ADAPTER_MISSING = "adapter_missing"  # 404: the worker does not hold the adapter the mapping says it does
    RETRY_BUDGET_EXHAUSTED = "retry_budget_exhausted"  # not an answer: the dispatcher stopped retrying

    @property
    def unreachable(self) -> bool:
        """The worker is not listening (mark it down at once)."""
        return self in (Failure.CONNECT_ERROR, Failure.CONNECT_TIMEOUT)

    @property
    def adapter_only(self) -> bool:
        """The worker is fine but lacks this adapter: not counted against its health; the replica
        is not asked for the adapter again until a probe reports it."""
        return self is Failure.ADAPTER_MISSING

    @property
    def broken(self) -> bool:
        """The worker answered, but not usefully (all attempts broken: 502)."""
        return self in (Failure.HTTP_500, Failure.BAD_RESPONSE)


_RETRYABLE_STATUS = {
    429: Failure.OVERLOADED,
    500: Failure.HTTP_500,
    502: Failure.HTTP_502,
    503: Failure.HTTP_503,
    504: Failure.HTTP_504,
    401: Failure.WORKER_AUTH,
    403: Failure.WORKER_AUTH,
    404: Failure.ADAPTER_MISSING,  # the coordinator checked the adapter; the worker lacks it
}


class AttemptFailed(Exception):
    """A safe failure of one attempt: the request did not run to an answer; another replica may try."""

    def __init__(self, reason: Failure | str, *, retry_after: float | None = None):
        self.reason = Failure(reason)
        super().__init__(self.reason.value)
        self.retry_after = retry_after


class AttemptTimedOut(Exception):
    """The backend did not answer within the call's timeout (not retried: the budget is spent)."""


@dataclass(frozen=True)
class CallContext:
    """Per-request facts a backend forwards: the request id and the remaining budget."""

    request_id: str
    timeout_s: float  # how long this call may take (min of the worker timeout and the budget left)
    connect_timeout_s: float  # TCP connect limit (the dispatch policy's connect_timeout_s)


@dataclass(frozen=True)
class Probe:
    """One health observation of a backend."""

    state: WorkerState
    adapters: list[AdapterInfo] | None = None  # what the backend reports it holds (None: unknown)
    latency_ms: float = 0.0
    error: str | None = None
    instance: str | None = None  # which process/container of the worker answered
    checks: dict[str, str] | None = None  # a vLLM worker's adapter checks (coordinator.adapter_check)


EventStream = AsyncIterator[InferStreamEvent]


class Backend(Protocol):
    """One worker: somewhere an :class:`InferRequest` can run."""

    worker_id: str

    async def infer(self, request: InferRequest, call: CallContext) -> InferResponse:
        """Run one request. Raises ``AttemptFailed``, ``AttemptTimedOut`` or ``ForwardedError``."""
        ...

    def stream(self, request: InferRequest, call: CallContext) -> AbstractAsyncContextManager[EventStream]:
        """Run one request streamed. Entering waits for the first token and raises as :meth:`infer`
        does (so the dispatcher may still try another replica); the events that follow are the
        text as it is generated, then the final answer (or an error event). A failure after the
        first token is raised from the iteration. Leaving the block early stops the request."""
        ...

    async def health(self) -> Probe:
        """Probe readiness; never raises."""
        ...


def read_answer(
    worker_id: str,
    status: int,
    body: Mapping[str, Any] | None,
    *,
    parse: Callable[[], InferResponse] | None = None,
    retry_after: float | None = None,
) -> InferResponse:
    """The outcome of one worker answer: ``status`` and its JSON ``body`` (None: unreadable).

    For a 200, ``parse()`` builds the answer (a ``ValidationError`` or ``ValueError`` from it is a
    ``bad_response``); when ``parse`` is None the body is validated as an :class:`InferResponse`.
    Raises ``AttemptFailed`` or ``ForwardedError`` for everything else (see the module docstring).
    """
    if status == 200:
        try:
            return parse() if parse is not None else InferResponse.model_validate(body)
        except (ValidationError, ValueError):
            raise AttemptFailed(Failure.BAD_RESPONSE) from None
    failure = _RETRYABLE_STATUS.get(status)
    if failure is not None:
        raise AttemptFailed(failure, retry_after=retry_after)
    error = body.get("error") if body is not None else None
    if not isinstance(error, dict):
        raise ForwardedError(worker_id, status, "worker_error", f"worker answered HTTP {status}")
    code = error.get("code")
    details = {k: v for k, v in error.items() if k not in ("code", "message")}
    raise ForwardedError(
        worker_id,
        status,
        code if isinstance(code, str) and _CODE.match(code) else "worker_error",
        str(error.get("message") or f"worker answered HTTP {status}"),
        **details,
    )


def read_error(worker_id: str, exc: MoleError) -> InferResponse:
    """The outcome of a worker's typed error raised in this process: the same table as over HTTP."""
    body = exc.to_body()
    return read_answer(worker_id, exc.status, body, retry_after=getattr(exc, "retry_after", None))


def _retry_after(resp: httpx.Response) -> float | None:
    try:
        return float(resp.headers["retry-after"])
    except (KeyError, ValueError):
        return None


def _json_or_none(resp: httpx.Response) -> dict[str, Any] | None:
    try:
        body = resp.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def ms_since(t0: float) -> float:
    """Milliseconds since ``t0`` (a ``time.perf_counter()``), rounded for logs and answers."""
    return round((time.perf_counter() - t0) * 1000, 2)


@contextlib.contextmanager
def _transport_failures(call: CallContext) -> Iterator[None]:
    """httpx's exceptions as attempt outcomes (see the module docstring)."""
    try:
        yield
    except httpx.ConnectTimeout:
        raise AttemptFailed(Failure.CONNECT_TIMEOUT) from None
    except (TimeoutError, httpx.TimeoutException):
        raise AttemptTimedOut(f"no answer within {call.timeout_s:.1f}s") from None
    except httpx.ConnectError:
        raise AttemptFailed(Failure.CONNECT_ERROR) from None
    except (httpx.ReadError, httpx.RemoteProtocolError):
        raise AttemptFailed(Failure.READ_ERROR) from None
    except httpx.TransportError:
        raise AttemptFailed(Failure.TRANSPORT_ERROR) from None


class HttpBackend:
    """A mole worker process reached over HTTP through the shared keep-alive client."""

    def __init__(self, spec: WorkerSpec, client: httpx.AsyncClient, *, token: str | None):
        self.worker_id = spec.id
        self.url = spec.url
        self._client = client
        self._token = token

    def _request(self, path: str, request: InferRequest, call: CallContext) -> httpx.Request:
        headers = {
            REQUEST_ID_HEADER: call.request_id,
            DEADLINE_HEADER: str(max(1, int(call.timeout_s * 1000))),
        }
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        timeout = httpx.Timeout(call.timeout_s, connect=min(call.connect_timeout_s, call.timeout_s))
        return self._client.build_request(
            "POST",
            f"{self.url}{path}",
            json=request.model_dump(exclude_none=True),
            headers=headers,
            timeout=timeout,
        )

    async def infer(self, request: InferRequest, call: CallContext) -> InferResponse:
        with _transport_failures(call):
            async with asyncio.timeout(call.timeout_s):  # the total, not per read: never hang
                resp = await self._client.send(self._request("/infer", request, call))
        return read_answer(
            self.worker_id,
            resp.status_code,
            None if resp.status_code == 200 else _json_or_none(resp),
            parse=lambda: InferResponse.model_validate_json(resp.content),
            retry_after=_retry_after(resp),
        )

    @contextlib.asynccontextmanager
    async def stream(self, request: InferRequest, call: CallContext) -> AsyncIterator[EventStream]:
        """``POST /infer/stream``: the worker answers its status with the first token; each line
        after it is one :class:`InferStreamEvent`. Closing the response stops the worker's row."""
        with _transport_failures(call):
            async with asyncio.timeout(call.timeout_s):  # until the first token
                resp = await self._client.send(self._request("/infer/stream", request, call), stream=True)
        try:
            if resp.status_code != 200:
                with _transport_failures(call):
                    await resp.aread()
                read_answer(
                    self.worker_id,
                    resp.status_code,
                    _json_or_none(resp),
                    retry_after=_retry_after(resp),
                )
            yield _stream_events(resp, call)
        finally:
            await resp.aclose()

    async def health(self) -> Probe:
        t0 = time.perf_counter()
        try:
            resp = await self._client.get(f"{self.url}/health/ready", timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError as exc:
            return Probe("down", latency_ms=ms_since(t0), error=type(exc).__name__)
        latency = ms_since(t0)
        if resp.status_code not in (200, 503):
            return Probe("down", latency_ms=latency, error=f"http_{resp.status_code}")
        try:
            ready = WorkerReady.model_validate_json(resp.content)
        except ValidationError:
            return Probe("down", latency_ms=latency, error="bad_health_body")
        return probe_of(ready, ok=resp.status_code == 200, latency_ms=latency)


async def _stream_events(resp: httpx.Response, call: CallContext) -> EventStream:
    with _transport_failures(call):
        async for line in resp.aiter_lines():
            if not line:
                continue
            try:
                yield InferStreamEvent.model_validate_json(line)
            except ValidationError:
                raise AttemptFailed(Failure.BAD_RESPONSE) from None


def probe_of(ready: WorkerReady, *, ok: bool = True, latency_ms: float = 0.0) -> Probe:
    """A worker's readiness body as a probe; ``ok`` is False when it came with a non-200 status.

    A 503 that claims "ready" is still not ready: the status code wins. Only a ready worker's
    adapter list is complete (a loading one reports what it has so far).
    """
    if ready.status == "failed":
        return Probe("failed", latency_ms=latency_ms, error=ready.error or "the worker failed to load")
    if ok and ready.status == "ready":
        return Probe("up", adapters=ready.adapters, latency_ms=latency_ms, instance=ready.instance)
    return Probe("draining" if ready.status == "draining" else "loading", latency_ms=latency_ms)
