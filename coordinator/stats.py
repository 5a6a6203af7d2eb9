"""The one point where served requests, routing decisions and errors are recorded.

:class:`RequestStats` keeps the counters behind ``GET /classify/stats`` and updates the matching
Prometheus metrics in the same call, so the two can never disagree about what was counted.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from coordinator.metrics import CoordinatorMetrics
from coordinator.router import RouteDecision
from shared.schemas import ClassifyResponse

logger = logging.getLogger(__name__)


@dataclass
class _Counts:
    started: float = field(default_factory=time.time)
    requests: int = 0
    by_adapter: Counter[str] = field(default_factory=Counter)
    by_routed_by: Counter[str] = field(default_factory=Counter)
    by_mode: Counter[str] = field(default_factory=Counter)
    degraded: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    confidence_sum: float = 0.0
    confidence_n: int = 0
    shadow_decisions: int = 0
    shadow_agreements: int = 0


class RequestStats:
    """Counters since start (``/classify/stats``) and their Prometheus twins."""

    def __init__(self, metrics: CoordinatorMetrics):
        self.metrics = metrics
        self._c = _Counts()

    def route(self, decision: RouteDecision, *, shadow: bool) -> None:
        """A routing decision (before dispatch): confidence, abstain fallbacks, shadow agreement."""
        if decision.top_k:
            self.metrics.router_confidence.observe(decision.top_k[0].probability)
        if decision.routed_by == "fallback" and not shadow:
            self.metrics.fallbacks.labels(decision.adapter, "router_abstain").inc()
        if shadow and decision.routed_by != "router" and decision.router_choice is not None:
            agree = decision.router_choice == decision.adapter
            self._c.shadow_decisions += 1
            self._c.shadow_agreements += agree
            self.metrics.shadow.labels("true" if agree else "false").inc()

    def served(self, r: ClassifyResponse) -> None:
        """A request answered with a worker's output."""
        c = self._c
        c.requests += 1
        c.by_adapter[r.adapter] += 1
        c.by_routed_by[r.routed_by] += 1
        c.by_mode[r.mode] += 1
        c.degraded += r.degraded
        if r.confidence is not None:
            c.confidence_sum += r.confidence
            c.confidence_n += 1
        self.metrics.routes.labels(r.adapter, r.routed_by).inc()
        self.metrics.request_seconds.labels(r.adapter).observe(r.timings_ms["total"] / 1000)
        logger.info(
            "served",
            extra={
                "request_id": r.request_id,
                "adapter": r.adapter,
                "worker_id": r.worker_id,
                "mode": r.mode,
                "routed_by": r.routed_by,
                "degraded": r.degraded,
                "latency_ms": r.timings_ms["total"],
            },
        )

    def failed(self, code: str, status: int, request_id: str, latency_ms: float) -> None:
        """A request answered with an error."""
        self._c.errors[code] += 1
        self.metrics.errors.labels(code).inc()
        logger.info(
            "request failed",
            extra={"request_id": request_id, "code": code, "status": status, "latency_ms": latency_ms},
        )

    def snapshot(self, shadow_enabled: bool) -> dict[str, Any]:
        """The ``GET /classify/stats`` body."""
        c = self._c
        return {
            "since": c.started,
            "requests": c.requests,
            "by_adapter": dict(c.by_adapter),
            "by_routed_by": dict(c.by_routed_by),
            "by_mode": dict(c.by_mode),
            "degraded": c.degraded,
            "errors": dict(c.errors),
            "mean_router_confidence": round(c.confidence_sum / c.confidence_n, 4) if c.confidence_n else None,
            "shadow": {
                "enabled": shadow_enabled,
                "decisions": c.shadow_decisions,
                "agreements": c.shadow_agreements,
                "agreement_rate": (
                    round(c.shadow_agreements / c.shadow_decisions, 4) if c.shadow_decisions else None
                ),
            },
        }
