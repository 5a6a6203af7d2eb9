"""Dispatch: adapter -> worker replicas, replica choice, retries, dynamic fallback, ejection.

The dispatcher owns one :class:`~coordinator.replicas.Replica` per worker of the mapping and reaches
each through its :class:`~coordinator.backends.Backend`; the :class:`~coordinator.replicas.HealthProber`
keeps their states current.

Failure policy (the mapping's ``dispatch`` policy):
- each replica takes at most its capacity at once: ``max_containers × max_concurrency`` (the
  mapping's worker fields; an autoscaled Modal app is one URL in front of up to ``max_containers``
  containers, and the backlog beyond one container is what makes it scale). A worker that answers
  429 is held, for its ``Retry-After``, at the in-flight count it accepted (backpressure). A
  request whose replicas are all busy waits for a slot (bounded: ``max_waiting`` waiters, then 429),
  so a burst queues here instead of overrunning the workers' queues;
- safe failures (see :class:`~coordinator.backends.Failure`) are retried (``retries``) on a
  *different* replica, within a retry budget (``retry_budget_*``: by default 20% of the requests
  of the last 10 s plus 10) so a failing fleet gets no retry storm; then a dynamic worker holding
  the adapter serves when ``fallback_to_dynamic`` (the answer is marked ``degraded``);
- a worker's other errors are the client's answer (:class:`~shared.errors.ForwardedError`);
- a worker that does not answer within ``request_timeout_s`` (or the request's remaining budget) is
  a 504; when every attempt got a broken answer (500, unreadable) it is a 502; when nothing usable
  is left it is a 503 naming the adapter and the workers tried;
- ``eject_after_failures`` consecutive failures eject a worker for ``eject_base_s * times_ejected``
  seconds, never when it is the last non-ejected replica of one of its adapters.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from coordinator.admission import RetryBudget, Slots
from coordinator.backends import (
    AttemptFailed,
    AttemptTimedOut,
    Backend,
    CallContext,
    EventStream,
    Failure,
    ms_since,
)
from coordinator.metrics import CoordinatorMetrics
from coordinator.replicas import HealthProber, Replica, publish_up
from shared.errors import ForwardedError, NoWorkerAvailable, Overloaded, WorkerError, WorkerTimeout
from shared.mapping import MoleMapping, WorkerSpec
from shared.schemas import InferRequest, InferResponse

logger = logging.getLogger(__name__)

BackendFactory = Callable[[WorkerSpec], Backend]
T = TypeVar("T")


@dataclass
class StreamDispatched:
    """A streamed request whose first token came: the replica's events and how it was reached."""

    events: EventStream
    worker_id: str
    degraded: bool
    path: list[str] = field(default_factory=list)
    worker_ms: float = 0.0  # time to the first token of the successful call
    dispatch_ms: float = 0.0


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
    """Owns the replicas of the current mapping: chooses, calls, retries, falls back, ejects."""

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
        self.budget = retry_budget or RetryBudget.of(mapping.dispatch)
        self.prober = HealthProber(self.replicas, metrics)
        self.slots = Slots(self.prober, metrics, max_waiting=max_waiting)
        self.update(mapping)

    # ---- mapping -------------------------------------------------------------------------------
    def update(self, mapping: MoleMapping) -> None:
        """Adopt a new mapping; replicas with the same id, URL, mode and engine (and vLLM context
        length) keep their health and counters; the others get a new backend."""
        replicas: dict[str, Replica] = {}
        for spec in mapping.workers:
            old = self._replicas.get(spec.id)
            same = ("url", "mode", "engine", "max_model_len")
            if old is not None and all(getattr(old.spec, k) == getattr(spec, k) for k in same):
                old.spec = spec
                replicas[spec.id] = old
            else:
                replicas[spec.id] = Replica(spec, self._factory(spec))
        for gone in self._replicas.keys() - replicas.keys():
            for gauge in (self._metrics.worker_up, self._metrics.worker_capacity):
                gauge.remove(gone)
            with contextlib.suppress(KeyError):
                self._metrics.worker_in_flight.remove(gone)
        if self._mapping.dispatch != mapping.dispatch:
            self.budget = RetryBudget.of(mapping.dispatch)  # a reload changed the policy
        self._mapping = mapping
        self._replicas = replicas
        for r in replicas.values():
            publish_up(self._metrics, r)
            self._metrics.worker_capacity.labels(r.spec.id).set(r.spec.capacity)
            self._metrics.worker_in_flight.labels(r.spec.id).set(r.in_flight)

    def replicas(self) -> list[Replica]:
        return list(self._replicas.values())

    def discovered(self) -> set[str]:
        """Names that workers report holding beyond the mapping's adapters (adapters dropped on a
        volume, the served base model): callable by name, never routed to by the router."""
        names = {a.name for r in self._replicas.values() for a in r.reported or []}
        return names - set(self._mapping.adapters)

    def any_up(self) -> bool:
        now = time.monotonic()
        return any(r.state == "up" and not r.ejected(now) for r in self._replicas.values())

    def view(self) -> list[dict[str, Any]]:
        """``GET /workers`` rows."""
        now = time.monotonic()
        return [r.view(now) for r in self._replicas.values()]

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
            return merged, dynamic if self._mapping.dispatch.fallback_to_dynamic else []
        return dynamic + merged, []

    # ---- dispatch ------------------------------------------------------------------------------
    async def dispatch(
        self, request: InferRequest, *, prefer_merged: bool, request_id: str, deadline: float
    ) -> Dispatched:
        """Serve ``request`` on a replica of its adapter (see the module docstring for the policy).

        ``deadline`` is the request's ``time.monotonic()`` budget end.
        """

        @contextlib.asynccontextmanager
        async def call(backend: Backend, ctx: CallContext) -> AsyncIterator[InferResponse]:
            yield await backend.infer(request, ctx)

        async with self._served(request.adapter, call, prefer_merged, request_id, deadline) as served:
            response, wid, degraded, path, worker_ms, dispatch_ms = served
        return Dispatched(response, wid, degraded, path, worker_ms, dispatch_ms)

    @contextlib.asynccontextmanager
    async def stream(
        self, request: InferRequest, *, prefer_merged: bool, request_id: str, deadline: float
    ) -> AsyncIterator[StreamDispatched]:
        """Serve ``request`` streamed: the same policy as :meth:`dispatch` until the first token
        (retries and fallback happen only before it), then the replica's events. The replica's slot
        is held until the block is left; leaving it early (a client gone) stops the worker's row."""

        def call(backend: Backend, ctx: CallContext) -> contextlib.AbstractAsyncContextManager[EventStream]:
            return backend.stream(request, ctx)

        async with self._served(request.adapter, call, prefer_merged, request_id, deadline) as served:
            events, wid, degraded, path, worker_ms, dispatch_ms = served
            yield StreamDispatched(events, wid, degraded, path, worker_ms, dispatch_ms)

    @contextlib.asynccontextmanager
    async def _served(
        self,
        adapter: str,
        call: Callable[[Backend, CallContext], contextlib.AbstractAsyncContextManager[T]],
        prefer_merged: bool,
        request_id: str,
        deadline: float,
    ) -> AsyncIterator[tuple[T, str, bool, list[str], float, float]]:
        """The retry loop of :meth:`dispatch` and :meth:`stream`: enter ``call`` on replicas of
        ``adapter`` until one answers, and yield ``(its value, worker id, degraded, path,
        worker ms, dispatch ms)`` with the replica's slot held."""
        policy = self._mapping.dispatch
        primary, fallback = self.plan(adapter, prefer_merged)
        tried: list[dict[str, str]] = []
        path: list[str] = []
        overloaded: float | None = None
        t0 = time.perf_counter()
        self.budget.record_request()
        for tier, degraded in ((primary, False), (fallback, True)):
            for _ in range(policy.retries + 1):
                async with contextlib.AsyncExitStack() as stack:
                    replica = await stack.enter_async_context(
                        self.slots.hold(tier, {t["worker"] for t in tried}, deadline, adapter)
                    )
                    if replica is None:
                        break
                    wid = replica.spec.id
                    if tried:
                        if not self.budget.try_retry():
                            tried.append({"worker": wid, "reason": Failure.RETRY_BUDGET_EXHAUSTED.value})
                            raise self._unserved(adapter, tried, overloaded)
                        self._metrics.retries.labels(adapter).inc()
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise WorkerTimeout(
                            f"request budget spent before adapter {adapter} could be served",
                            adapter=adapter,
                            tried=tried,
                        )
                    ctx = CallContext(
                        request_id, min(policy.request_timeout_s, remaining), policy.connect_timeout_s
                    )
                    t1 = time.perf_counter()
                    try:
                        value = await stack.enter_async_context(self._attempt(replica, adapter, call, ctx))
                    except AttemptFailed as exc:
                        tried.append({"worker": wid, "reason": exc.reason.value})
                        path.append(f"{wid}:{exc.reason.value}")
                        if exc.reason is Failure.OVERLOADED:
                            overloaded = max(overloaded or 0.0, exc.retry_after or 1.0)
                            replica.throttle(exc.retry_after, time.monotonic())
                        continue
                    except AttemptTimedOut:
                        raise WorkerTimeout(
                            f"worker {wid} did not answer within {ctx.timeout_s:.1f}s (adapter {adapter})",
                            adapter=adapter,
                            worker=wid,
                            timeout_s=round(ctx.timeout_s, 3),
                        ) from None
                    path.append(f"{wid}:ok")
                    if degraded:
                        self._metrics.fallbacks.labels(adapter, "dynamic").inc()
                    yield value, wid, degraded, path, ms_since(t1), ms_since(t0)
                    return
        raise self._unserved(adapter, tried, overloaded)

    def _unserved(self, adapter: str, tried: list[dict[str, str]], overloaded: float | None) -> Exception:
        if overloaded is not None and all(t["reason"] == Failure.OVERLOADED for t in tried):
            return Overloaded(
                f"every worker holding adapter {adapter} is overloaded",
                retry_after=overloaded,
                adapter=adapter,
            )
        holders = [
            {"worker": r.spec.id, "state": r.state, "ejected": r.ejected(time.monotonic())}
            for r in self._replicas.values()
            if adapter in r.spec.adapters or r.holds(adapter)
        ]
        attempts = ", ".join(f"{t['worker']} ({t['reason']})" for t in tried)
        if tried and all(Failure(t["reason"]).broken for t in tried):
            return WorkerError(
                f"every worker tried for adapter {adapter} failed: {attempts}", adapter=adapter, tried=tried
            )
        if tried:
            message = f"no worker could serve adapter {adapter}: tried {attempts}"
        else:
            states = ", ".join(f"{h['worker']} ({h['state']})" for h in holders) or "none"
            message = f"no ready worker holds adapter {adapter}; replicas: {states}"
        return NoWorkerAvailable(message, adapter=adapter, tried=tried, replicas=holders)

    @contextlib.asynccontextmanager
    async def _attempt(
        self,
        replica: Replica,
        adapter: str,
        call: Callable[[Backend, CallContext], contextlib.AbstractAsyncContextManager[T]],
        ctx: CallContext,
    ) -> AsyncIterator[T]:
        """One call on ``replica`` (whose slot the caller holds), with its health bookkeeping: what
        fails while entering, and a stream that breaks after it, counts against the replica."""
        t0 = time.perf_counter()
        outcome = "error"
        try:
            async with call(replica.backend, ctx) as value:
                outcome = "ok"
                replica.consecutive_failures = 0
                yield value
        except AttemptFailed as exc:
            if exc.reason.adapter_only:
                replica.lacks(adapter)  # the worker does not hold it (yet): not a health fault
            else:
                self._failed(replica, exc.reason.value, down=exc.reason.unreachable)
            raise
        except AttemptTimedOut:
            self._failed(replica, "timeout")
            raise
        except ForwardedError as exc:
            if exc.status >= 500:
                self._failed(replica, f"http_{exc.status}")
            # a 4xx is the request's own fault (bad input, 422 unprocessable): the worker is as
            # healthy as before, so its failure count is left as it was
            raise
        finally:
            self._metrics.dispatch_seconds.labels(replica.spec.id, outcome).observe(time.perf_counter() - t0)

    # ---- failures and ejection -----------------------------------------------------------------
    def failed_midway(self, worker_id: str, reason: str, *, down: bool = False) -> None:
        """A streamed call that broke after its first token (its slot is already accounted for):
        counted against the worker like a failed call."""
        replica = self._replicas.get(worker_id)
        if replica is not None:
            self._failed(replica, reason, down=down)

    def _failed(self, replica: Replica, reason: str, *, down: bool = False) -> None:
        replica.last_error = reason
        replica.consecutive_failures += 1
        if down and replica.state != "down":
            replica.state = "down"  # fail over at once; the prober marks it up when it answers again
            logger.warning("worker unreachable, marked down", extra={"worker_id": replica.spec.id})
        policy = self._mapping.dispatch
        now = time.monotonic()
        if replica.consecutive_failures >= policy.eject_after_failures and not replica.ejected(now):
            if self._is_last_replica(replica, now):
                logger.warning(
                    "worker keeps failing but is the last replica of an adapter; not ejected",
                    extra={"worker_id": replica.spec.id, "failures": replica.consecutive_failures},
                )
            else:
                replica.times_ejected += 1
                seconds = policy.eject_base_s * replica.times_ejected
                replica.ejected_until = now + seconds
                replica.consecutive_failures = 0
                self._metrics.ejections.labels(replica.spec.id).inc()
                logger.warning("worker ejected", extra={"worker_id": replica.spec.id, "eject_s": seconds})
        publish_up(self._metrics, replica)

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
