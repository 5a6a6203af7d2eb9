"""What the coordinator knows about each worker, and the health prober that keeps it current.

A :class:`Replica` is one worker of the mapping with its backend, its last observed state, its
load (in-flight requests) and its ejection. :class:`HealthProber` probes every replica on an
interval and, on demand, those a request found unusable (a worker that just finished loading or
came back must not wait for the next round).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator.backends import Backend, Probe, WorkerState
from coordinator.metrics import CoordinatorMetrics
from shared.mapping import WorkerSpec
from shared.schemas import AdapterInfo

logger = logging.getLogger(__name__)

REFRESH_AFTER_S = 0.25  # a request finding no usable replica re-probes those probed longer ago
# Adapters (and instances) reported by any probe this recently count as the worker's: probes of an
# autoscaled app land on different containers, whose lists may differ for a while (a hot load
# reaches one container first), and the view must not flip between them.
REPORT_WINDOW_S = 30.0


@dataclass
class Replica:
    """What the coordinator knows about one worker."""

    spec: WorkerSpec
    backend: Backend
    state: WorkerState = "unknown"
    reported: list[AdapterInfo] | None = None  # adapters reported within REPORT_WINDOW_S (union)
    checks: dict[str, str] | None = None  # a vLLM worker's adapter checks (name -> outcome)
    seen: dict[str, tuple[float, AdapterInfo]] = field(default_factory=dict)  # name -> (when, info)
    instances: dict[str, float] = field(default_factory=dict)  # answering instance -> when
    last_probe: float | None = None  # wall-clock time of the last probe
    probe_latency_ms: float | None = None
    last_error: str | None = None
    in_flight: int = 0
    last_pick: float = 0.0  # time.monotonic() of the last request sent here (tie-break)
    consecutive_failures: int = 0
    times_ejected: int = 0
    ejected_until: float = 0.0  # time.monotonic() until which the replica is not used
    throttled_until: float = 0.0  # time.monotonic() until which throttle_limit caps in_flight
    throttle_limit: int = 0  # in-flight requests the worker took when it last answered 429

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def usable(self, now: float) -> bool:
        """Ready (or not probed yet) and not ejected."""
        return self.state in ("up", "unknown") and not self.ejected(now)

    def limit(self, now: float) -> int:
        """In-flight requests allowed now: the worker's capacity (``max_containers ×
        max_concurrency``, see :attr:`WorkerSpec.capacity`), lowered for a while after a 429."""
        return self.throttle_limit if now < self.throttled_until else self.spec.capacity

    @property
    def has_slot(self) -> bool:
        """Below :meth:`limit`."""
        return self.in_flight < self.limit(time.monotonic())

    def load(self, now: float) -> float:
        """In-flight requests as a fraction of :meth:`limit` (replicas of different sizes compare)."""
        return self.in_flight / max(1, self.limit(now))

    def throttle(self, retry_after_s: float | None, now: float) -> None:
        """Backpressure from the worker's 429 (this request still in flight): until ``retry_after_s``
        passes (1 s by default, at most 10 s), send no more than it held without refusing."""
        self.throttle_limit = max(1, self.in_flight - 1)
        self.throttled_until = now + min(10.0, retry_after_s or 1.0)

    def missing(self) -> list[str]:
        """Adapters the mapping assigns here that the worker does not report holding."""
        if self.reported is None:
            return []
        held = {a.name for a in self.reported}
        return [name for name in self.spec.adapters if name not in held]

    def lacks(self, adapter: str) -> None:
        """The worker answered 404 for ``adapter``: treat it as missing until a probe reports it."""
        if self.reported is not None:
            self.reported = [a for a in self.reported if a.name != adapter]
        else:
            self.reported = [AdapterInfo(name=n, sha256="") for n in self.spec.adapters if n != adapter]
        self.last_error = f"adapter_missing:{adapter}"

    def holds(self, adapter: str) -> bool:
        """The mapping assigns ``adapter`` here and the worker did not say it lacks it, or the
        worker reports holding it (an adapter it discovered on its volume, the base model)."""
        if adapter in self.spec.adapters:
            return adapter not in self.missing()
        if self.spec.mode != "dynamic":  # a merged worker serves its one checkpoint only
            return False
        return self.reported is not None and any(a.name == adapter for a in self.reported)

    def view(self, now: float) -> dict[str, Any]:
        """This replica's ``GET /workers`` row."""
        reported = [a.model_dump() for a in self.reported] if self.reported is not None else None
        extra = sorted({a.name for a in self.reported} - set(self.spec.adapters)) if self.reported else []
        return {
            "id": self.spec.id,
            "url": self.spec.url,
            "mode": self.spec.mode,
            "adapters": list(self.spec.adapters),
            "state": self.state,
            "available": self.usable(now),
            "ejected": self.ejected(now),
            "ejected_for_s": round(max(0.0, self.ejected_until - now), 1),
            "times_ejected": self.times_ejected,
            "in_flight": self.in_flight,
            "capacity": self.spec.capacity,
            "limit": self.limit(now),
            "consecutive_failures": self.consecutive_failures,
            "reported_adapters": reported,
            "instances_seen": len(self.instances),  # containers answering probes in the window
            "missing_adapters": self.missing(),
            "extra_adapters": extra,
            "last_probe": self.last_probe,
            "last_probe_latency_ms": self.probe_latency_ms,
            "last_error": self.last_error,
            "adapter_checks": self.checks,
        }


def publish_up(metrics: CoordinatorMetrics, replica: Replica) -> None:
    """``mole_coordinator_worker_up``: 1 when the replica is up and not ejected."""
    up = replica.state == "up" and not replica.ejected(time.monotonic())
    metrics.worker_up.labels(replica.spec.id).set(1 if up else 0)


class HealthProber:
    """Probes the replicas that ``replicas()`` returns and records what it sees on them."""

    def __init__(self, replicas: Callable[[], Sequence[Replica]], metrics: CoordinatorMetrics):
        self._replicas = replicas
        self._metrics = metrics

    async def probe_all(self) -> None:
        """Probe every replica once, concurrently, and record the results."""
        await self._probe(list(self._replicas()))

    async def refresh(self, replicas: Sequence[Replica]) -> None:
        """Probe the unusable, non-ejected ``replicas`` whose last probe is older than
        ``REFRESH_AFTER_S`` (the prober's view may be stale)."""
        now, mono = time.time(), time.monotonic()
        await self._probe(
            [
                r
                for r in replicas
                if not r.usable(mono)
                and not r.ejected(mono)
                and (r.last_probe is None or now - r.last_probe > REFRESH_AFTER_S)
            ]
        )

    async def run(self, interval_s: Callable[[], float]) -> None:
        """Probe forever every ``interval_s()`` seconds (read each round, so reloads apply)."""
        while True:
            try:
                await self.probe_all()
            except Exception:  # a prober that dies silently would freeze every worker's state
                logger.exception("health probe round failed")
            await asyncio.sleep(interval_s())

    async def _probe(self, replicas: list[Replica]) -> None:
        if not replicas:
            return
        probes = await asyncio.gather(*(r.backend.health() for r in replicas))
        for replica, probe in zip(replicas, probes, strict=True):
            self.record(replica, probe)

    def record(self, replica: Replica, probe: Probe) -> None:
        """Adopt one probe: state, latency, error, the adapters the worker reports."""
        wid = replica.spec.id
        if probe.state != replica.state:
            log = logger.info if probe.state == "up" else logger.warning
            log("worker state %s -> %s", replica.state, probe.state, extra={"worker_id": wid})
            if probe.state == "up":  # back from down/loading (e.g. restarted): a fresh start
                replica.ejected_until = 0.0
                replica.consecutive_failures = 0
            if probe.state == "failed":
                logger.error("worker failed to load: %s", probe.error, extra={"worker_id": wid})
        replica.state = probe.state
        replica.last_probe = time.time()
        replica.probe_latency_ms = probe.latency_ms
        if probe.error is not None:
            replica.last_error = probe.error
        if probe.checks is not None:
            replica.checks = dict(probe.checks)
        if probe.adapters is not None:
            before = replica.missing()
            replica.reported = self._remember(replica, probe)
            missing = replica.missing()
            if missing and missing != before:
                logger.warning(
                    "worker does not hold adapters the mapping assigns to it; not used for them: %s",
                    ", ".join(missing),
                    extra={"worker_id": wid},
                )
        publish_up(self._metrics, replica)

    @staticmethod
    def _remember(replica: Replica, probe: Probe) -> list[AdapterInfo]:
        """Add ``probe``'s adapters and instance to what the replica reported within
        ``REPORT_WINDOW_S``; return that union (latest info per adapter, by name)."""
        now = time.monotonic()
        for info in probe.adapters or []:
            replica.seen[info.name] = (now, info)
        if probe.instance is not None:
            replica.instances[probe.instance] = now
        fresh = now - REPORT_WINDOW_S
        replica.seen = {name: (t, info) for name, (t, info) in replica.seen.items() if t >= fresh}
        replica.instances = {inst: t for inst, t in replica.instances.items() if t >= fresh}
        return [replica.seen[name][1] for name in sorted(replica.seen)]
