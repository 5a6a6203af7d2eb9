"""Dispatch: adapter -> worker replicas, replica choice, retries, dynamic fallback, health probes.

A :class:`Backend` is one place a request can run (``name``, ``mode``, ``schedule``, ``health``). The
HTTP backend talks to a worker process through the app's one shared ``httpx.AsyncClient``; a later
in-process backend (monolithic mode) plugs in through the same interface via ``backend_factory``.

Failure policy (``routing`` in the mapping):
- each replica takes at most ``max_concurrency`` requests at once (the mapping's worker field); a
  request whose replicas are all busy waits for a slot (bounded: ``max_waiting`` waiters, then 429),
  so a burst queues here instead of overrunning the workers' queues;
- safe failures (connect error, read error before a response, 500/502/503/504, 429, an unreadable
  answer) are retried once (``retries``) on a *different* replica, within a retry budget of 20% of
  recent requests (plus a small floor) so a failing fleet gets no retry storm; then a dynamic worker
  holding the adapter serves when ``fallback_to_dynamic`` (the answer is marked ``degraded``);
- a worker's 4xx is the client's answer: passed through with the worker's status and body;
- a worker that does not answer within ``request_timeout_s`` (or the request's remaining budget) is
  a 504; when every attempt got a broken answer (500, unreadable) it is a 502; when nothing usable
  is left it is a 503 naming the adapter and the workers tried;
- ``eject_after_failures`` consecutive failures eject a worker for ``eject_base_s * times_ejected``
  seconds, never when it is the last non-ejected replica of one of its adapters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import httpx
from pydantic import ValidationError

from coordinator.metrics import CoordinatorMetrics
from shared.errors import REQUEST_ID_HEADER, NoWorkerAvailable, Overloaded, WorkerError, WorkerTimeout
from shared.mapping import MoleMapping, WorkerSpec
from shared.schemas import AdapterInfo, InferRequest, InferResponse, Mode, WorkerReady

logger = logging.getLogger(__name__)

DEADLINE_HEADER = "X-Mole-Deadline-Ms"  # remaining budget of the request, in milliseconds
PROBE_TIMEOUT_S = 5.0  # a health probe slower than this counts as down
REFRESH_AFTER_S = 0.25  # a request finding no usable replica re-probes those probed longer ago
WorkerState = Literal["unknown", "up", "loading", "draining", "down"]
_CONNECT_FAILURES = frozenset({"connect_error", "connect_timeout"})  # the worker is not listening
_BROKEN_ANSWERS = frozenset({"http_500", "bad_response"})  # the worker answered, but not usefully


class RetryBudget:
    """Retries allowed: ``ratio`` of the requests seen in the last ``window_s``, plus ``floor``.

    Linkerd's default budget (20% over 10 s, with a floor) keeps a failing fleet from being hit
    by a retry storm while one failed replica's in-flight requests are still retried.
    """

    def __init__(self, ratio: float = 0.2, floor: int = 10, window_s: float = 10.0):
        self.ratio = ratio
        self.floor = floor
        self.window_s = window_s
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _trim(self, now: float) -> None:
        for q in (self._requests, self._retries):
            while q and q[0] < now - self.window_s:
                q.popleft()

    def record_request(self) -> None:
        now = time.monotonic()
        self._trim(now)
        self._requests.append(now)

    def try_retry(self) -> bool:
        """Spend one retry if the budget allows it."""
        now = time.monotonic()
        self._trim(now)
        if len(self._retries) >= self.floor + self.ratio * len(self._requests):
            return False
        self._retries.append(now)
        return True


# ---- backend interface --------------------------------------------------------------------------


@dataclass(frozen=True)
class CallContext:
    """Per-request facts a backend forwards: the request id and the remaining budget."""

    request_id: str
    timeout_s: float  # how long this call may take (min of the worker timeout and the budget left)
    connect_timeout_s: float  # TCP connect limit (routing.connect_timeout_s)


@dataclass(frozen=True)
class Probe:
    """One health observation of a backend."""

    state: WorkerState
    adapters: list[AdapterInfo] | None = None  # what the backend reports it holds (None: unknown)
    latency_ms: float = 0.0
    error: str | None = None


class AttemptFailed(Exception):
    """A safe failure of one attempt: the request did not run to an answer; another replica may try."""

    def __init__(self, reason: str, *, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason  # connect_error, read_error, http_503, overloaded, bad_response, ...
        self.retry_after = retry_after


class AttemptTimedOut(Exception):
    """The backend did not answer within the call's timeout (not retried: the budget is spent)."""


class WorkerRejected(Exception):
    """The worker answered an error that is the client's answer (4xx, 500): status and body as is."""

    def __init__(self, worker_id: str, status: int, body: dict[str, Any]):
        super().__init__(f"worker {worker_id} answered {status}")
        self.worker_id = worker_id
        self.status = status
        self.body = body

    @property
    def code(self) -> str:
        error = self.body.get("error")
        return str(error.get("code", "worker_error")) if isinstance(error, dict) else "worker_error"

    @property
    def message(self) -> str:
        error = self.body.get("error")
        return str(error.get("message", "")) if isinstance(error, dict) else f"worker answered {self.status}"


class Backend(Protocol):
    """Somewhere an :class:`InferRequest` can run."""

    name: str  # worker id
    mode: Mode

    async def schedule(self, request: InferRequest, ctx: CallContext) -> InferResponse:
        """Run one request. Raises ``AttemptFailed``, ``AttemptTimedOut`` or ``WorkerRejected``."""
        ...

    async def health(self) -> Probe:
        """Probe readiness; never raises."""
        ...


BackendFactory = Callable[[WorkerSpec], Backend]


def _error_body(resp: httpx.Response) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body
    return {"error": {"code": "worker_error", "message": f"worker answered HTTP {resp.status_code}"}}


def _retry_after(resp: httpx.Response) -> float | None:
    try:
        return float(resp.headers["retry-after"])
    except (KeyError, ValueError):
        return None


class HttpBackend:
    """A worker process reached over HTTP through the shared keep-alive client."""

    def __init__(self, spec: WorkerSpec, client: httpx.AsyncClient, *, token: str | None):
        self.name = spec.id
        self.mode: Mode = spec.mode
        self.url = spec.url
        self._client = client
        self._token = token

    async def schedule(self, request: InferRequest, ctx: CallContext) -> InferResponse:
        headers = {REQUEST_ID_HEADER: ctx.request_id, DEADLINE_HEADER: str(max(1, int(ctx.timeout_s * 1000)))}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        timeout = httpx.Timeout(ctx.timeout_s, connect=min(ctx.connect_timeout_s, ctx.timeout_s))
        body = request.model_dump(exclude_none=True)
        try:
            async with asyncio.timeout(ctx.timeout_s):  # the total, not per read: never hang
                resp = await self._client.post(
                    f"{self.url}/infer", json=body, headers=headers, timeout=timeout
                )
        except httpx.ConnectTimeout:
            raise AttemptFailed("connect_timeout") from None
        except (TimeoutError, httpx.TimeoutException):
            raise AttemptTimedOut(f"no answer within {ctx.timeout_s:.1f}s") from None
        except httpx.ConnectError:
            raise AttemptFailed("connect_error") from None
        except (httpx.ReadError, httpx.RemoteProtocolError):
            raise AttemptFailed("read_error") from None
        except httpx.TransportError:
            raise AttemptFailed("transport_error") from None
        return self._answer(resp)

    def _answer(self, resp: httpx.Response) -> InferResponse:
        status = resp.status_code
        if status == 200:
            try:
                return InferResponse.model_validate_json(resp.content)
            except ValidationError:
                raise AttemptFailed("bad_response") from None
        if status == 429:
            raise AttemptFailed("overloaded", retry_after=_retry_after(resp))
        if status in (500, 502, 503, 504):
            raise AttemptFailed(f"http_{status}", retry_after=_retry_after(resp))
        if status in (401, 403):  # our worker token is wrong for this worker: not the client's fault
            raise AttemptFailed("worker_auth")
        raise WorkerRejected(self.name, status, _error_body(resp))

    async def health(self) -> Probe:
        t0 = time.perf_counter()
        try:
            resp = await self._client.get(f"{self.url}/health/ready", timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError as exc:
            return Probe("down", latency_ms=_ms_since(t0), error=type(exc).__name__)
        latency = _ms_since(t0)
        if resp.status_code not in (200, 503):
            return Probe("down", latency_ms=latency, error=f"http_{resp.status_code}")
        try:
            ready = WorkerReady.model_validate_json(resp.content)
        except ValidationError:
            return Probe("down", latency_ms=latency, error="bad_health_body")
        state: WorkerState
        if resp.status_code == 200 and ready.status == "ready":
            state = "up"
        else:  # a 503 that claims "ready" is still not ready: trust the status code
            state = "draining" if ready.status == "draining" else "loading"
        # Only a ready worker's adapter list is complete (a loading one reports what it has so far).
        return Probe(state, adapters=ready.adapters if state == "up" else None, latency_ms=latency)


def _ms_since(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)


# ---- replica bookkeeping ------------------------------------------------------------------------


@dataclass
class Replica:
    """What the coordinator knows about one worker."""

    spec: WorkerSpec
    backend: Backend
    state: WorkerState = "unknown"
    reported: list[AdapterInfo] | None = None  # adapters from the last successful probe
    last_probe: float | None = None  # wall-clock time of the last probe
    probe_latency_ms: float | None = None
    last_error: str | None = None
    in_flight: int = 0
    last_pick: float = 0.0  # time.monotonic() of the last request sent here (tie-break)
    consecutive_failures: int = 0
    times_ejected: int = 0
    ejected_until: float = 0.0  # time.monotonic() until which the replica is not used

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def usable(self, now: float) -> bool:
        """Ready (or not probed yet) and not ejected."""
        return self.state in ("up", "unknown") and not self.ejected(now)

    @property
    def has_slot(self) -> bool:
        """Below the worker's ``max_concurrency``."""
        return self.in_flight < self.spec.max_concurrency

    def missing(self) -> list[str]:
        """Adapters the mapping assigns here that the worker does not report holding."""
        if self.reported is None:
            return []
        held = {a.name for a in self.reported}
        return [name for name in self.spec.adapters if name not in held]

    def holds(self, adapter: str) -> bool:
        return adapter in self.spec.adapters and adapter not in self.missing()


@dataclass
class Dispatched:
    """A served request: the worker's answer and how it was reached."""

    response: InferResponse
    worker_id: str
    degraded: bool  # served by the dynamic fallback instead of a preferred merged replica
    path: list[str] = field(default_factory=list)  # "worker:outcome" per attempt
    worker_ms: float = 0.0  # round trip of the successful call
    dispatch_ms: float = 0.0  # all attempts


class Dispatcher:
    """Owns the replicas of the current mapping: chooses, calls, retries, falls back, ejects, probes."""

    def __init__(
        self,
        mapping: MoleMapping,
        backend_factory: BackendFactory,
        metrics: CoordinatorMetrics,
        *,
        max_waiting: int = 256,
        retry_budget: RetryBudget | None = None,
    ):
        self._factory = backend_factory
        self._metrics = metrics
        self._mapping = mapping
        self._replicas: dict[str, Replica] = {}
        self.max_waiting = max_waiting  # requests waiting for a replica slot before answering 429
        self.waiting = 0
        self._slot_freed = asyncio.Event()
        self.budget = retry_budget or RetryBudget()
        self.update(mapping)

    # ---- mapping -------------------------------------------------------------------------------
    def update(self, mapping: MoleMapping) -> None:
        """Adopt a new mapping; replicas with the same id, URL and mode keep their health and counters."""
        replicas: dict[str, Replica] = {}
        for spec in mapping.workers:
            old = self._replicas.get(spec.id)
            if old is not None and old.spec.url == spec.url and old.spec.mode == spec.mode:
                old.spec = spec
                replicas[spec.id] = old
            else:
                replicas[spec.id] = Replica(spec, self._factory(spec))
        for gone in self._replicas.keys() - replicas.keys():
            self._metrics.worker_up.remove(gone)
        self._mapping = mapping
        self._replicas = replicas
        for r in replicas.values():
            self._set_up_gauge(r)

    def replicas(self) -> list[Replica]:
        return list(self._replicas.values())

    # ---- choice --------------------------------------------------------------------------------
    def plan(self, adapter: str, prefer_merged: bool) -> tuple[list[Replica], list[Replica]]:
        """(primary, fallback) replicas holding ``adapter``, in mapping order.

        With ``prefer_merged`` and a merged replica, merged replicas are primary and dynamic ones the
        fallback (only with ``fallback_to_dynamic``); otherwise every replica is primary, dynamic first.
        """
        holders = [r for r in self._replicas.values() if r.holds(adapter)]
        merged = [r for r in holders if r.spec.mode == "merged"]
        dynamic = [r for r in holders if r.spec.mode == "dynamic"]
        if prefer_merged and merged:
            return merged, dynamic if self._mapping.routing.fallback_to_dynamic else []
        return dynamic + merged, []

    @staticmethod
    def _order(tier: Sequence[Replica], exclude: set[str], now: float) -> list[Replica]:
        """Usable replicas not yet tried: probed-ready before unprobed, then least in-flight."""
        usable = [r for r in tier if r.usable(now) and r.spec.id not in exclude]
        preferred = tier[0].spec.mode if tier else None  # plan() puts the preferred mode first
        # the preferred mode, then least in-flight; among equals the one picked longest ago, so
        # idle replicas share the load
        return sorted(
            usable, key=lambda r: (r.state != "up", r.spec.mode != preferred, r.in_flight, r.last_pick)
        )

    def _notify_slot(self) -> None:
        self._slot_freed.set()
        self._slot_freed = asyncio.Event()

    async def _acquire(
        self, tier: Sequence[Replica], exclude: set[str], deadline: float, adapter: str
    ) -> Replica | None:
        """Take a slot on the best usable replica of ``tier``; wait while all of them are busy.

        None when no replica of the tier is usable. Raises ``Overloaded`` when too many requests
        already wait, ``WorkerTimeout`` when the deadline passes while waiting.
        """
        waited = False
        refreshed = False
        try:
            while True:
                candidates = self._order(tier, exclude, time.monotonic())
                if not candidates and not refreshed:
                    # the prober's view may be stale (a worker that just finished loading, or came
                    # back): probe this tier's holders now, at most once per request
                    refreshed = await self._refresh([r for r in tier if r.spec.id not in exclude])
                    candidates = self._order(tier, exclude, time.monotonic())
                if not candidates:
                    return None
                free = [r for r in candidates if r.has_slot]
                if free:
                    free[0].in_flight += 1
                    free[0].last_pick = time.monotonic()
                    return free[0]
                if not waited:
                    if self.waiting >= self.max_waiting:
                        raise Overloaded(
                            f"{self.waiting} requests already wait for a worker of adapter {adapter}",
                            retry_after=1.0,
                            adapter=adapter,
                        )
                    self.waiting += 1
                    waited = True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WorkerTimeout(
                        f"every replica of adapter {adapter} stayed busy until the deadline", adapter=adapter
                    )
                event = self._slot_freed
                try:
                    await asyncio.wait_for(event.wait(), timeout=min(remaining, 1.0))
                except TimeoutError:
                    pass  # re-check: probes may have changed states
        finally:
            if waited:
                self.waiting -= 1

    async def _refresh(self, replicas: Sequence[Replica]) -> bool:
        """Probe the not-usable ``replicas`` whose last probe is older than ``REFRESH_AFTER_S``."""
        now = time.time()
        stale = [
            r
            for r in replicas
            if not r.usable(time.monotonic())
            and not r.ejected(time.monotonic())
            and (r.last_probe is None or now - r.last_probe > REFRESH_AFTER_S)
        ]
        if stale:
            probes = await asyncio.gather(*(r.backend.health() for r in stale))
            for replica, probe in zip(stale, probes, strict=True):
                self._record_probe(replica, probe)
        return True

    # ---- dispatch ------------------------------------------------------------------------------
    async def dispatch(
        self, request: InferRequest, *, prefer_merged: bool, request_id: str, deadline: float
    ) -> Dispatched:
        """Serve ``request`` on a replica of its adapter (see the module docstring for the policy).

        ``deadline`` is the request's ``time.monotonic()`` budget end.
        """
        routing = self._mapping.routing
        adapter = request.adapter
        primary, fallback = self.plan(adapter, prefer_merged)
        tried: list[dict[str, str]] = []
        path: list[str] = []
        overloaded: float | None = None
        t0 = time.perf_counter()
        self.budget.record_request()
        for tier, degraded in ((primary, False), (fallback, True)):
            for _ in range(routing.retries + 1):
                replica = await self._acquire(tier, {t["worker"] for t in tried}, deadline, adapter)
                if replica is None:
                    break
                if tried:
                    if not self.budget.try_retry():
                        replica.in_flight -= 1
                        self._notify_slot()
                        tried.append({"worker": replica.spec.id, "reason": "retry_budget_exhausted"})
                        raise self._unserved(adapter, tried, overloaded)
                    self._metrics.retries.labels(adapter).inc()
                now = time.monotonic()
                remaining = deadline - now
                if remaining <= 0:
                    replica.in_flight -= 1
                    self._notify_slot()
                    raise WorkerTimeout(
                        f"request budget spent before adapter {adapter} could be served",
                        adapter=adapter,
                        tried=tried,
                    )
                ctx = CallContext(
                    request_id, min(routing.request_timeout_s, remaining), routing.connect_timeout_s
                )
                try:
                    response, worker_ms = await self._call(replica, request, ctx)
                except AttemptFailed as exc:
                    tried.append({"worker": replica.spec.id, "reason": exc.reason})
                    path.append(f"{replica.spec.id}:{exc.reason}")
                    if exc.reason == "overloaded":
                        overloaded = max(overloaded or 0.0, exc.retry_after or 1.0)
                    continue
                except AttemptTimedOut:
                    raise WorkerTimeout(
                        f"worker {replica.spec.id} did not answer within {ctx.timeout_s:.1f}s "
                        f"(adapter {adapter})",
                        adapter=adapter,
                        worker=replica.spec.id,
                        timeout_s=round(ctx.timeout_s, 3),
                    ) from None
                path.append(f"{replica.spec.id}:ok")
                if degraded:
                    self._metrics.fallbacks.labels(adapter, "dynamic").inc()
                dispatch_ms = _ms_since(t0)
                return Dispatched(response, replica.spec.id, degraded, path, worker_ms, dispatch_ms)
        raise self._unserved(adapter, tried, overloaded)

    def _unserved(self, adapter: str, tried: list[dict[str, str]], overloaded: float | None) -> Exception:
        if overloaded is not None and all(t["reason"] == "overloaded" for t in tried):
            return Overloaded(
                f"every worker holding adapter {adapter} is overloaded",
                retry_after=overloaded,
                adapter=adapter,
            )
        holders = [
            {"worker": r.spec.id, "state": r.state, "ejected": r.ejected(time.monotonic())}
            for r in self._replicas.values()
            if adapter in r.spec.adapters
        ]
        if tried and all(t["reason"] in _BROKEN_ANSWERS for t in tried):
            attempts = ", ".join(f"{t['worker']} ({t['reason']})" for t in tried)
            return WorkerError(
                f"every worker tried for adapter {adapter} failed: {attempts}", adapter=adapter, tried=tried
            )
        if tried:
            attempts = ", ".join(f"{t['worker']} ({t['reason']})" for t in tried)
            message = f"no worker could serve adapter {adapter}: tried {attempts}"
        else:
            states = ", ".join(f"{h['worker']} ({h['state']})" for h in holders) or "none"
            message = f"no ready worker holds adapter {adapter}; replicas: {states}"
        return NoWorkerAvailable(message, adapter=adapter, tried=tried, replicas=holders)

    async def _call(
        self, replica: Replica, request: InferRequest, ctx: CallContext
    ) -> tuple[InferResponse, float]:
        """Call ``replica`` (whose slot ``_acquire`` took) and release the slot afterwards."""
        t0 = time.perf_counter()
        outcome = "error"
        try:
            response = await replica.backend.schedule(request, ctx)
            outcome = "ok"
        except AttemptFailed as exc:
            self._failed(replica, exc.reason, down=exc.reason in _CONNECT_FAILURES)
            raise
        except AttemptTimedOut:
            self._failed(replica, "timeout")
            raise
        except WorkerRejected as exc:
            if exc.status >= 500:
                self._failed(replica, f"http_{exc.status}")
            else:  # the worker is healthy; the request was bad
                replica.consecutive_failures = 0
            raise
        finally:
            replica.in_flight -= 1
            self._notify_slot()
            self._metrics.dispatch_seconds.labels(replica.spec.id, outcome).observe(time.perf_counter() - t0)
        replica.consecutive_failures = 0
        return response, _ms_since(t0)

    # ---- failures and ejection -----------------------------------------------------------------
    def _failed(self, replica: Replica, reason: str, *, down: bool = False) -> None:
        replica.last_error = reason
        replica.consecutive_failures += 1
        if down and replica.state != "down":
            replica.state = "down"  # fail over at once; the prober marks it up when it answers again
            logger.warning("worker unreachable, marked down", extra={"worker_id": replica.spec.id})
        routing = self._mapping.routing
        now = time.monotonic()
        if replica.consecutive_failures >= routing.eject_after_failures and not replica.ejected(now):
            if self._is_last_replica(replica, now):
                logger.warning(
                    "worker keeps failing but is the last replica of an adapter; not ejected",
                    extra={"worker_id": replica.spec.id, "failures": replica.consecutive_failures},
                )
            else:
                replica.times_ejected += 1
                seconds = routing.eject_base_s * replica.times_ejected
                replica.ejected_until = now + seconds
                replica.consecutive_failures = 0
                self._metrics.ejections.labels(replica.spec.id).inc()
                logger.warning("worker ejected", extra={"worker_id": replica.spec.id, "eject_s": seconds})
        self._set_up_gauge(replica)

    def _is_last_replica(self, replica: Replica, now: float) -> bool:
        for adapter in replica.spec.adapters:
            others = [
                r
                for r in self._replicas.values()
                if r is not replica and adapter in r.spec.adapters and not r.ejected(now)
            ]
            if not others:
                return True
        return False

    def _set_up_gauge(self, replica: Replica) -> None:
        up = replica.state == "up" and not replica.ejected(time.monotonic())
        self._metrics.worker_up.labels(replica.spec.id).set(1 if up else 0)

    # ---- health --------------------------------------------------------------------------------
    async def probe_all(self) -> None:
        """Probe every replica once, concurrently, and record the results."""
        replicas = list(self._replicas.values())
        probes = await asyncio.gather(*(r.backend.health() for r in replicas))
        for replica, probe in zip(replicas, probes, strict=True):
            self._record_probe(replica, probe)

    def _record_probe(self, replica: Replica, probe: Probe) -> None:
        wid = replica.spec.id
        if probe.state != replica.state:
            log = logger.info if probe.state == "up" else logger.warning
            log("worker state %s -> %s", replica.state, probe.state, extra={"worker_id": wid})
            if probe.state == "up":  # back from down/loading (e.g. restarted): a fresh start
                replica.ejected_until = 0.0
                replica.consecutive_failures = 0
        replica.state = probe.state
        replica.last_probe = time.time()
        replica.probe_latency_ms = probe.latency_ms
        if probe.error is not None:
            replica.last_error = probe.error
        if probe.adapters is not None:
            before = replica.missing()
            replica.reported = probe.adapters
            missing = replica.missing()
            if missing and missing != before:
                logger.warning(
                    "worker does not hold adapters the mapping assigns to it; not used for them: %s",
                    ", ".join(missing),
                    extra={"worker_id": wid},
                )
        self._set_up_gauge(replica)

    async def run_prober(self, interval_s: Callable[[], float]) -> None:
        """Probe forever every ``interval_s()`` seconds (read each round, so reloads apply)."""
        while True:
            try:
                await self.probe_all()
            except Exception:  # a prober that dies silently would freeze every worker's state
                logger.exception("health probe round failed")
            await asyncio.sleep(interval_s())

    def any_up(self) -> bool:
        now = time.monotonic()
        return any(r.state == "up" and not r.ejected(now) for r in self._replicas.values())

    def view(self) -> list[dict[str, Any]]:
        """``GET /workers`` rows."""
        now = time.monotonic()
        rows = []
        for r in self._replicas.values():
            reported = [a.model_dump() for a in r.reported] if r.reported is not None else None
            extra = sorted({a.name for a in r.reported} - set(r.spec.adapters)) if r.reported else []
            rows.append(
                {
                    "id": r.spec.id,
                    "url": r.spec.url,
                    "mode": r.spec.mode,
                    "adapters": list(r.spec.adapters),
                    "state": r.state,
                    "available": r.usable(now),
                    "ejected": r.ejected(now),
                    "ejected_for_s": round(max(0.0, r.ejected_until - now), 1),
                    "times_ejected": r.times_ejected,
                    "in_flight": r.in_flight,
                    "consecutive_failures": r.consecutive_failures,
                    "reported_adapters": reported,
                    "missing_adapters": r.missing(),
                    "extra_adapters": extra,
                    "last_probe": r.last_probe,
                    "last_probe_latency_ms": r.probe_latency_ms,
                    "last_error": r.last_error,
                }
            )
        return rows
