"""Admission: which replica a request may call now, and how many retries the fleet may take.

:class:`Slots` holds each replica to its limit (``max_concurrency`` × ``max_containers``, lowered
for a while by a 429): a request whose replicas are all busy waits for a slot, bounded by
``max_waiting`` waiters (then 429), so a burst queues here instead of overrunning the workers'
queues. :class:`RetryBudget` bounds retries to a share of recent requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence

from coordinator.metrics import CoordinatorMetrics
from coordinator.replicas import HealthProber, Replica
from shared.errors import Overloaded, WorkerTimeout
from shared.mapping import DispatchPolicy


class RetryBudget:
    """Retries allowed: ``ratio`` of the requests seen in the last ``window_s``, plus ``floor``.

    Linkerd's default budget (20% over 10 s, with a floor) keeps a failing fleet from being hit
    by a retry storm while one failed replica's in-flight requests are still retried.
    """

    @classmethod
    def of(cls, policy: DispatchPolicy) -> RetryBudget:
        """The budget the dispatch policy asks for."""
        return cls(policy.retry_budget_ratio, policy.retry_budget_floor, policy.retry_budget_window_s)

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


class Slots:
    """Replica slots: taken and given back in :meth:`hold` and nowhere else."""

    def __init__(self, prober: HealthProber, metrics: CoordinatorMetrics, *, max_waiting: int = 256):
        self._prober = prober
        self._metrics = metrics
        self.max_waiting = max_waiting  # requests waiting for a replica slot before answering 429
        self.waiting = 0
        self._slot_freed = asyncio.Event()

    @staticmethod
    def order(tier: Sequence[Replica], exclude: set[str], now: float) -> list[Replica]:
        """Usable replicas not yet tried: probed-ready before unprobed, then least loaded."""
        usable = [r for r in tier if r.usable(now) and r.spec.id not in exclude]
        preferred = tier[0].spec.mode if tier else None  # plan() puts the preferred mode first
        # the preferred mode, then least loaded (in-flight / limit); among equals the one picked longest ago, so
        # idle replicas share the load
        return sorted(
            usable, key=lambda r: (r.state != "up", r.spec.mode != preferred, r.load(now), r.last_pick)
        )

    @contextlib.asynccontextmanager
    async def hold(
        self, tier: Sequence[Replica], exclude: set[str], deadline: float, adapter: str
    ) -> AsyncIterator[Replica | None]:
        """Hold a slot on the best usable replica of ``tier`` for the block; wait while all are busy.

        Yields None when no replica of the tier is usable. The slot is taken and released here and
        nowhere else. Raises ``Overloaded`` when too many requests already wait, ``WorkerTimeout``
        when the deadline passes while waiting.
        """
        replica = await self._wait(tier, exclude, deadline, adapter)
        if replica is None:
            yield None
            return
        replica.in_flight += 1
        replica.last_pick = time.monotonic()
        in_flight = self._metrics.worker_in_flight.labels(replica.spec.id)
        in_flight.set(replica.in_flight)
        try:
            yield replica
        finally:
            replica.in_flight -= 1
            in_flight.set(replica.in_flight)
            self._slot_freed.set()
            self._slot_freed = asyncio.Event()

    async def _wait(
        self, tier: Sequence[Replica], exclude: set[str], deadline: float, adapter: str
    ) -> Replica | None:
        waited = False
        refreshed = False
        try:
            while True:
                candidates = self.order(tier, exclude, time.monotonic())
                if not candidates and not refreshed:
                    # the prober's view may be stale (a worker that just finished loading, or came
                    # back): probe this tier's holders now, at most once per request
                    await self._prober.refresh([r for r in tier if r.spec.id not in exclude])
                    refreshed = True
                    candidates = self.order(tier, exclude, time.monotonic())
                if not candidates:
                    return None
                free = [r for r in candidates if r.has_slot]
                if free:
                    return free[0]
                if not waited:
                    if self.waiting >= self.max_waiting:
                        raise Overloaded(
                            f"{self.waiting} requests already wait for a worker of adapter {adapter}",
                            retry_after=1.0,
                            adapter=adapter,
                        )
                    self.waiting += 1
                    self._metrics.waiting.set(self.waiting)
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
                self._metrics.waiting.set(self.waiting)
