"""The worker's Prometheus metrics, defined once on a per-app registry (labels: adapter, status).

No ``*_created`` series (they double the series count and no dashboard reads them). On Modal,
``/metrics`` answers from whichever container the load balancer picks, so these are one container's
counts; the coordinator's per-worker metrics are the app-wide view (docs/deploy.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class WorkerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        disable_created_metrics()  # process-wide in prometheus_client; no service wants them
        r = self.registry
        self.requests = Counter(
            "mole_worker_requests",
            "Inference requests by adapter and outcome",
            ["adapter", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "mole_worker_request_seconds",
            "End-to-end /infer latency",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "mole_worker_queue_wait_seconds",
            "Time from admission to batch start",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "mole_worker_batch_size",
            "Rows per generate call",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=r,
        )
        self.batch_seconds = Histogram(
            "mole_worker_batch_seconds", "Duration of one generate call", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("mole_worker_queue_depth", "Requests waiting for a batch", registry=r)
        self.tokens = Counter("mole_worker_tokens_generated", "Generated tokens", ["adapter"], registry=r)
        self.prompt_tokens = Counter(
            "mole_worker_prompt_tokens", "Prompt tokens, visual tokens included", ["adapter"], registry=r
        )
        self.image_tokens = Counter(
            "mole_worker_image_tokens", "Visual tokens of the requests' images", ["adapter"], registry=r
        )
        self.gpu_memory = Gauge(
            "mole_worker_gpu_memory_bytes",
            "GPU memory of the worker's device (kind: allocated, reserved by torch; total); no samples on CPU",
            ["kind"],
            registry=r,
        )
        self.abandoned = Counter(
            "mole_worker_streams_abandoned",
            "Streamed requests whose client left before the end (their rows stop at the next token)",
            ["adapter"],
            registry=r,
        )
        self.ready = Gauge("mole_worker_ready", "1 when the model is loaded and warmed", registry=r)
        self.cancelled = Counter(
            "mole_worker_cancelled_requests",
            "Requests dropped because their caller disconnected (queued rows removed, running rows stopped)",
            registry=r,
        )
        self.adapters_loaded = Gauge("mole_worker_adapters_loaded", "Adapters held", registry=r)

    def observe_gpu(self, device: str) -> None:
        """Read the device's memory into :attr:`gpu_memory` (a no-op unless ``device`` is cuda)."""
        if not device.startswith("cuda"):
            return
        import torch

        self.gpu_memory.labels("allocated").set(torch.cuda.memory_allocated(device))
        self.gpu_memory.labels("reserved").set(torch.cuda.memory_reserved(device))
        self.gpu_memory.labels("total").set(torch.cuda.get_device_properties(device).total_memory)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
