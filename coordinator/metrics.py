"""The coordinator's Prometheus metrics, defined once per app on its own registry.

Labels stay low-cardinality: adapter names and worker ids come from the mapping (never from the
request), plus small fixed vocabularies (routed_by, outcome, reason, code). No ``*_created`` series.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class CoordinatorMetrics:
    """Every coordinator metric on one ``CollectorRegistry`` (one per app, so tests stay isolated)."""

    def __init__(self) -> None:
        disable_created_metrics()  # process-wide in prometheus_client; they double the series count
        self.registry = CollectorRegistry()
        r = self.registry
        self.routes = Counter(
            "mole_coordinator_routes_total",
            "Requests served, by adapter and how the adapter was chosen",
            ["adapter", "routed_by"],
            registry=r,
        )
        self.router_confidence = Histogram(
            "mole_coordinator_router_confidence",
            "Top-label probability of router decisions",
            buckets=_CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.router_batch_seconds = Histogram(
            "mole_coordinator_router_batch_seconds",
            "Router forward time per batch",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.router_batch_size = Histogram(
            "mole_coordinator_router_batch_size",
            "Requests per router forward",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.dispatch_seconds = Histogram(
            "mole_coordinator_dispatch_seconds",
            "One worker call, by worker and outcome (ok, error)",
            ["worker", "outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "mole_coordinator_retries_total",
            "Dispatch attempts on another replica after a safe failure",
            ["adapter"],
            registry=r,
        )
        self.fallbacks = Counter(
            "mole_coordinator_fallbacks_total",
            "Requests served by a fallback: dynamic (no merged replica) or router_abstain",
            ["adapter", "reason"],
            registry=r,
        )
        self.errors = Counter(
            "mole_coordinator_errors_total",
            "Requests answered with an error, by error code",
            ["code"],
            registry=r,
        )
        self.shadow = Counter(
            "mole_coordinator_shadow_decisions_total",
            "Shadow-mode router decisions, by agreement with the served adapter",
            ["agree"],
            registry=r,
        )
        self.worker_up = Gauge(
            "mole_coordinator_worker_up",
            "1 when the last health probe found the worker ready and it is not ejected",
            ["worker"],
            registry=r,
        )
        self.worker_in_flight = Gauge(
            "mole_coordinator_worker_in_flight",
            "Requests the coordinator has sent to the worker and not yet had answered",
            ["worker"],
            registry=r,
        )
        self.worker_capacity = Gauge(
            "mole_coordinator_worker_capacity",
            "Requests the coordinator sends the worker at once (max_containers x max_concurrency)",
            ["worker"],
            registry=r,
        )
        self.waiting = Gauge(
            "mole_coordinator_waiting_requests",
            "Requests waiting at the coordinator for a free worker slot (where an autoscaled backlog builds)",
            registry=r,
        )
        self.request_seconds = Histogram(
            "mole_coordinator_request_seconds",
            "End-to-end latency of served requests (route + dispatch), by adapter",
            ["adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ejections = Counter(
            "mole_coordinator_worker_ejections_total",
            "Times a worker was ejected after consecutive failures",
            ["worker"],
            registry=r,
        )
        self.cancelled = Counter(
            "mole_coordinator_cancelled_requests_total",
            "Requests cancelled because the client disconnected before the answer",
            registry=r,
        )
        self.reloads = Counter(
            "mole_coordinator_mapping_reloads_total",
            "Mapping reload attempts, by result (ok, rejected)",
            ["result"],
            registry=r,
        )
