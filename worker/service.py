"""The worker's serving object: input limits, the micro-batcher in front of the holder, readiness.

Routes call :meth:`WorkerService.infer`; it validates against the settings, decodes the image and
renders the prompt off the event loop, and submits one row to the batcher, whose thread runs the
holder's generate. Loading happens in a background thread after start-up so that liveness answers
while readiness stays 503 until the model is loaded and warmed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from PIL import Image

from shared.batching import BatchSettings, MicroBatcher
from shared.errors import AdapterNotFound, NotReady
from shared.images import PixelBudget, decode_image, image_pixels
from shared.limits import check_text_limits
from shared.mapping import MoleMapping
from shared.modeling import Generated, GenerationParams, max_visual_tokens, memory_in_use, render_prompt
from shared.schemas import AdapterInfo, InferRequest, InferResponse, WorkerInfo, WorkerReady
from shared.settings import Settings
from worker.holders import ModelHolder, Row, make_holder
from worker.metrics import WorkerMetrics

logger = logging.getLogger(__name__)

State = Literal["loading", "ready", "draining", "failed"]


class WorkerService:
    """One worker: a model holder, its batcher, its metrics and its lifecycle state."""

    def __init__(
        self,
        settings: Settings,
        mapping: MoleMapping,
        worker_id: str,
        *,
        device: str,
        dtype: str,
        refresh_storage: Callable[[], None] | None = None,
    ):
        self.settings = settings
        # Makes files written to the weight storage since this process started visible to it (Modal:
        # Volume.reload()); called before an adapter is read from a path. None: plain disks.
        self.refresh_storage = refresh_storage
        self.instance = f"{socket.gethostname()}-{os.getpid()}"  # one container of a scaled app
        self.mapping = mapping
        self.spec = mapping.worker(worker_id)
        self.holder: ModelHolder = make_holder(self.spec, mapping, device=device, dtype=dtype)
        self.metrics = WorkerMetrics()
        self.state: State = "loading"
        self.load_error: str | None = None
        self.batcher: MicroBatcher[Row, Generated] = MicroBatcher(
            self.holder.generate,
            BatchSettings(settings.max_batch_size, settings.max_wait_ms, settings.max_queue),
            key=lambda row: row.batch_key,
            name=f"worker-{worker_id}",
            on_batch=self.metrics.observe_batch,
        )
        self._adapter_locks: dict[str, asyncio.Lock] = {}
        self.pixels = PixelBudget(settings.max_pixels_in_flight)  # decoded pixels held by queued/running rows

    # ---- lifecycle -------------------------------------------------------------------------
    def start_loading(self) -> threading.Thread:
        """Load and warm the model in a background thread; readiness flips when done."""
        thread = threading.Thread(target=self._load, name="worker-load", daemon=True)
        thread.start()
        return thread

    def _load(self) -> None:
        try:
            self.load()
        except Exception:
            logger.exception("worker %s failed to load %s", self.spec.id, self.holder.model_path)

    def load(self) -> None:
        """Load and warm the model, start the batcher, turn ready (blocking; re-raises a failure,
        after which the state is ``failed``)."""
        t0 = time.perf_counter()
        try:
            self.holder.load()
            self._warm_up()
        except Exception as exc:
            self.state = "failed"
            self.load_error = f"{exc.__class__.__name__}: {exc}"
            raise
        self.batcher.start()
        self.state = "ready"
        self.metrics.ready.set(1)
        self.metrics.adapters_loaded.set(len(self.holder.adapters()))
        logger.info(
            "worker %s ready: %s holder, %d adapter(s), loaded in %.1fs; %s",
            self.spec.id,
            self.spec.mode,
            len(self.holder.adapters()),
            time.perf_counter() - t0,
            memory_in_use(self.holder.device),
        )

    def _warm_up(self) -> None:
        """One tiny generation per adapter, so the first request pays no lazy initialisation."""
        image = Image.new("RGB", (64, 64), (128, 128, 128))
        text = render_prompt(self.holder.processor, "warm up")
        rows = [Row(image, text, name, GenerationParams(max_new_tokens=2)) for name in self.holder.adapters()]
        self.holder.generate(rows)
        self.holder.canary = Row(image, text, rows[0].adapter, GenerationParams(max_new_tokens=1))

    def drain(self) -> None:
        """Stop admitting; finish queued and running work within the drain timeout."""
        self.state = "draining"
        self.metrics.ready.set(0)
        self.batcher.stop(self.settings.drain_timeout_s)

    # ---- requests --------------------------------------------------------------------------
    def require_ready(self) -> None:
        if self.state != "ready":
            raise NotReady(f"worker {self.spec.id} is {self.state}", state=self.state)

    def _validate(self, req: InferRequest) -> GenerationParams:
        s = self.settings
        check_text_limits(s, req.prompt, req.max_new_tokens)
        adapters = self.holder.adapters()
        if req.adapter not in adapters:
            raise AdapterNotFound(
                f"adapter {req.adapter!r} is not held by worker {self.spec.id}; it holds: {', '.join(sorted(adapters))}",
                adapters=sorted(adapters),
            )
        spec = self.mapping.adapters.get(req.adapter)
        default = spec.max_new_tokens if spec and spec.max_new_tokens else s.default_max_new_tokens
        return GenerationParams(
            max_new_tokens=min(req.max_new_tokens or default, s.max_new_tokens_cap),
            temperature=req.temperature,
            top_p=req.top_p,
        )

    def _prepare(self, req: InferRequest, params: GenerationParams) -> Row:
        image = decode_image(
            req.image_b64, max_bytes=self.settings.max_image_bytes, max_pixels=self.settings.max_image_pixels
        )
        spec = self.mapping.adapters.get(req.adapter)
        text = render_prompt(self.holder.processor, req.prompt, spec.system_prompt if spec else None)
        return Row(image, text, req.adapter, params, req.seed)

    async def infer(self, req: InferRequest, *, deadline: float | None = None) -> InferResponse:
        """Serve one request; raises typed errors (bad input, unknown adapter, overload, timeout).

        The decoded image's pixels are held in :attr:`pixels` from decoding until the row's batch
        is done (429 when the worker already holds its budget). Cancelled (the client went away),
        the row is dropped from the queue or, running, finished at its next token.
        """
        self.require_ready()
        t0 = time.perf_counter()
        status = "error"
        row: Row | None = None
        try:
            params = self._validate(req)
            s = self.settings
            pixels = await asyncio.to_thread(
                image_pixels, req.image_b64, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels
            )
            with self.pixels.hold(pixels):
                row = await asyncio.to_thread(self._prepare, req, params)
                t1 = time.perf_counter()
                self.metrics.queue_depth.set(self.batcher.queue_depth)
                result = await self.batcher.submit(row, deadline=deadline)
                row = None  # the decoded image is not needed any more
            t2 = time.perf_counter()
            status = "ok"
        except asyncio.CancelledError:
            status = "cancelled"
            if row is not None:
                row.cancelled.set()
            self.metrics.cancelled.inc()
            raise
        except Exception as exc:
            status = getattr(exc, "code", "error")
            raise
        finally:
            self.metrics.requests.labels(adapter=self._metric_adapter(req.adapter), status=status).inc()
            self.metrics.queue_depth.set(self.batcher.queue_depth)
        self.metrics.latency.labels(adapter=req.adapter).observe(t2 - t0)
        self.metrics.tokens.labels(adapter=req.adapter).inc(result.tokens)
        self.metrics.prompt_tokens.labels(adapter=req.adapter).inc(result.prompt_tokens)
        self.metrics.image_tokens.labels(adapter=req.adapter).inc(result.image_tokens)
        return InferResponse(
            output=result.text,
            adapter=req.adapter,
            mode=self.spec.mode,
            worker_id=self.spec.id,
            tokens_generated=result.tokens,
            prompt_tokens=result.prompt_tokens,
            image_tokens=result.image_tokens,
            timings_ms={
                "prepare": round((t1 - t0) * 1000, 3),
                "queue_and_generate": round((t2 - t1) * 1000, 3),
                "total": round((t2 - t0) * 1000, 3),
            },
        )

    def _metric_adapter(self, name: str) -> str:
        """Adapter label for metrics: unknown names collapse to one value (bounded cardinality)."""
        return name if name in self.holder.adapters() else "unknown"

    # ---- views -----------------------------------------------------------------------------
    def ready_body(self) -> WorkerReady:
        """The readiness body: the state as is (``failed`` carries the load error)."""
        return WorkerReady(
            status=self.state,
            worker_id=self.spec.id,
            mode=self.spec.mode,
            adapters=[AdapterInfo(name=n, sha256=h) for n, h in sorted(self.holder.adapters().items())],
            error=self.load_error,
            instance=self.instance,
        )

    def info(self) -> WorkerInfo:
        s = self.settings
        return WorkerInfo(
            worker_id=self.spec.id,
            mode=self.spec.mode,
            adapters=sorted(self.holder.adapters()),
            base_model=str(self.holder.model_path),
            device=self.holder.device,
            dtype=self.holder.dtype,
            max_batch_size=s.max_batch_size,
            max_wait_ms=s.max_wait_ms,
            max_queue=s.max_queue,
            max_new_tokens_cap=s.max_new_tokens_cap,
            max_pixels=self.spec.max_pixels,
            min_pixels=self.spec.min_pixels,
            max_image_tokens=(
                max_visual_tokens(self.holder.processor, self.spec.max_pixels)
                if self.holder.processor
                else None
            ),
        )

    # ---- hot adapter management (dynamic workers) -----------------------------------------
    def _lock_for(self, name: str) -> asyncio.Lock:
        return self._adapter_locks.setdefault(name, asyncio.Lock())

    async def load_adapter(self, name: str, path: str) -> AdapterInfo:
        self.require_ready()
        async with self._lock_for(name):
            if self.refresh_storage is not None:  # a file put on the volume after this container started
                await asyncio.to_thread(self.refresh_storage)
            digest = await asyncio.to_thread(self.holder.add_adapter, name, Path(path))
        self.metrics.adapters_loaded.set(len(self.holder.adapters()))
        return AdapterInfo(name=name, sha256=digest)

    async def unload_adapter(self, name: str) -> None:
        self.require_ready()
        async with self._lock_for(name):
            await asyncio.to_thread(self.holder.remove_adapter, name)
        self.metrics.adapters_loaded.set(len(self.holder.adapters()))
