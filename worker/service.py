"""The worker's serving object: input limits, the micro-batcher in front of the holder, readiness.

Routes call :meth:`WorkerService.infer`; it validates against the settings, decodes the image and
renders the prompt off the event loop, and submits one row to the batcher, whose thread runs the
holder's generate. Loading happens in a background thread after start-up so that liveness answers
while readiness stays 503 until the model is loaded and warmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Literal

from PIL import Image

from shared.batching import BatchSettings, MicroBatcher
from shared.checkpoints import memory_in_use
from shared.errors import AdapterNotFound, MoleError, NotReady
from shared.images import PixelBudget, ScannedImage, scan_image
from shared.limits import check_text_limits
from shared.mapping import MoleMapping
from shared.modeling import (
    Generated,
    GenerationParams,
    Turn,
    max_visual_tokens,
    neutralise_special_tokens,
    render_prompt,
)
from shared.schemas import (
    AdapterInfo,
    ErrorBody,
    InferRequest,
    InferResponse,
    InferStreamEvent,
    WorkerInfo,
    WorkerReady,
)
from shared.settings import Settings
from worker.holders import ModelHolder, Row, make_holder
from worker.metrics import WorkerMetrics

logger = logging.getLogger(__name__)

State = Literal["loading", "ready", "draining", "failed"]


class InferStream:
    """A started streamed request: its first piece of text, then :meth:`events` to the end."""

    def __init__(
        self,
        first: str | None,
        queue: asyncio.Queue[str | None],
        task: asyncio.Future[InferResponse],
        cancelled: threading.Event,
        on_abandon: Callable[[], None],
    ):
        self._first = first
        self._queue = queue
        self._task = task
        self._cancelled = cancelled
        self._on_abandon = on_abandon

    async def events(self) -> AsyncGenerator[InferStreamEvent, None]:
        """``delta`` events as the worker produces them, then ``final`` (or ``error``). Leaving the
        iteration early cancels the request."""
        try:
            piece = self._first
            while piece is not None:
                yield InferStreamEvent(delta=piece)
                piece = await self._queue.get()
            try:
                final = await self._task
            except MoleError as exc:
                yield InferStreamEvent(error=ErrorBody(**exc.to_body()["error"]))
                return
            yield InferStreamEvent(final=final)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the request (if it still runs): its row ends at its next token."""
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        if not self._task.done():
            self._task.cancel()
            self._on_abandon()


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
        self._stop_discovery = threading.Event()

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
        if self.spec.discover is not None and self.settings.discover_interval_s > 0:
            threading.Thread(target=self._discover_loop, name="worker-discover", daemon=True).start()
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
        self._stop_discovery.set()
        self.metrics.ready.set(0)
        self.batcher.stop(self.settings.drain_timeout_s)

    # ---- requests --------------------------------------------------------------------------
    def require_ready(self) -> None:
        if self.state != "ready":
            raise NotReady(f"worker {self.spec.id} is {self.state}", state=self.state)

    def _validate(self, req: InferRequest) -> GenerationParams:
        s = self.settings
        adapters = self.holder.adapters()
        if req.adapter not in adapters:
            raise AdapterNotFound(
                f"adapter {req.adapter!r} is not held by worker {self.spec.id}; it holds: {', '.join(sorted(adapters))}",
                adapters=sorted(adapters),
            )
        spec = self.mapping.adapters.get(req.adapter)
        cap = spec.max_new_tokens_cap if spec and spec.max_new_tokens_cap else s.max_new_tokens_cap
        check_text_limits(s, req.prompt, req.max_new_tokens, cap=cap)
        default = (spec.max_new_tokens if spec else None) or s.default_max_new_tokens or cap
        return GenerationParams(
            max_new_tokens=min(req.max_new_tokens or default, cap),
            temperature=req.temperature,
            top_p=req.top_p,
        )

    def _prepare(self, req: InferRequest, params: GenerationParams, scanned: ScannedImage | None) -> Row:
        image = scanned.decode() if scanned is not None else None
        spec = self.mapping.adapters.get(req.adapter)
        tokenizer = self.holder.processor.tokenizer
        system = (  # a client's system prompt is client text; the mapping's is used as written
            neutralise_special_tokens(tokenizer, req.system_prompt)
            if req.system_prompt is not None
            else (spec.system_prompt if spec else None)
        )
        history = [Turn(t.role, t.text) for t in req.history]
        text = render_prompt(
            self.holder.processor, req.prompt, system, history=history, image=image is not None
        )
        return Row(image, text, req.adapter, params, req.seed, stop=tuple(req.stop))

    async def infer(self, req: InferRequest, *, deadline: float | None = None) -> InferResponse:
        """Serve one request; raises typed errors (bad input, unknown adapter, overload, timeout).

        The decoded image's pixels are held in :attr:`pixels` from decoding until the row's batch
        is done (429 when the worker already holds its budget). Cancelled (the client went away),
        the row is dropped from the queue or, running, finished at its next token.
        """
        row, pixels, t0, t1 = await self._admit(req)
        return await self._finish(req, row, pixels, self.batcher.submit(row, deadline=deadline), t0, t1)

    async def open_stream(self, req: InferRequest, *, deadline: float | None = None) -> InferStream:
        """Start one streamed request and wait for its first piece of text.

        Everything that fails before the first token raises here, as :meth:`infer` would (so an
        HTTP caller still gets a status it may retry); what fails later is the stream's ``error``
        event. Closing the stream early (a client gone) ends the row at its next token.
        """
        row, pixels, t0, t1 = await self._admit(req)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()

        def sink(text: str) -> None:  # on the compute thread
            loop.call_soon_threadsafe(queue.put_nowait, text)

        row = replace(row, sink=sink)
        pending = self.batcher.submit(row, deadline=deadline)
        task = asyncio.ensure_future(self._finish(req, row, pixels, pending, t0, t1))
        task.add_done_callback(lambda _t: queue.put_nowait(None))
        try:
            first = await queue.get()
            if first is None:
                task.result()  # raises what failed before the first token
        except BaseException:
            row.cancelled.set()
            task.cancel()
            raise
        abandoned = self.metrics.abandoned.labels(adapter=self._metric_adapter(req.adapter))
        return InferStream(first, queue, task, row.cancelled, abandoned.inc)

    async def _admit(self, req: InferRequest) -> tuple[Row, contextlib.ExitStack, float, float]:
        """Validate, take the image's pixels from the budget, decode and render: a row ready to
        queue, and the pixel hold that :meth:`_finish` gives back."""
        self.require_ready()
        t0 = time.perf_counter()
        pixels = contextlib.ExitStack()
        try:
            params = self._validate(req)
            s = self.settings
            scanned = None
            if req.image_b64 is not None:  # header only: the budget is taken before any pixel is decoded
                scanned = await asyncio.to_thread(
                    scan_image, req.image_b64, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels
                )
                pixels.enter_context(self.pixels.hold(scanned.pixels))
            row = await asyncio.to_thread(self._prepare, req, params, scanned)
        except BaseException as exc:
            pixels.close()
            self._count(req.adapter, getattr(exc, "code", "error"))
            raise
        self.metrics.queue_depth.set(self.batcher.queue_depth)
        return row, pixels, t0, time.perf_counter()

    async def _finish(
        self,
        req: InferRequest,
        row: Row,
        pixels: contextlib.ExitStack,
        pending: Awaitable[Generated],
        t0: float,
        t1: float,
    ) -> InferResponse:
        status = "error"
        try:
            with pixels:
                result = await pending
            status = "ok"
        except asyncio.CancelledError:
            status = "cancelled"
            row.cancelled.set()
            self.metrics.cancelled.inc()
            raise
        except Exception as exc:
            status = getattr(exc, "code", "error")
            raise
        finally:
            self._count(req.adapter, status)
        t2 = time.perf_counter()
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
            finish_reason=result.finish_reason,
            timings_ms={
                "prepare": round((t1 - t0) * 1000, 3),
                "queue_and_generate": round((t2 - t1) * 1000, 3),
                "total": round((t2 - t0) * 1000, 3),
            },
        )

    def _count(self, adapter: str, status: str) -> None:
        self.metrics.requests.labels(adapter=self._metric_adapter(adapter), status=status).inc()
        self.metrics.queue_depth.set(self.batcher.queue_depth)

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

    def discover(self, *, settled: bool = True) -> list[AdapterInfo]:
        """Load the adapters dropped into the ``discover`` folder since the last look (blocking).

        ``settled``: only folders unchanged since the previous look (a poll never loads a copy in
        progress); an explicit rescan loads every complete folder at once. A folder that fails to
        load is logged and tried again at the next look.
        """
        if self.spec.discover is not None and self.refresh_storage is not None:
            self.refresh_storage()  # e.g. Modal's Volume.reload(): see files put after this container started
        loaded = []
        for name, path in self.holder.undiscovered(settled=settled).items():
            try:
                digest = self.holder.add_adapter(name, path)
            except Exception:
                logger.exception("could not load discovered adapter %s from %s", name, path)
                continue
            logger.info("discovered adapter %s", name, extra={"adapter": name})
            loaded.append(AdapterInfo(name=name, sha256=digest))
        self.metrics.adapters_loaded.set(len(self.holder.adapters()))
        return loaded

    def _discover_loop(self) -> None:
        while not self._stop_discovery.wait(self.settings.discover_interval_s):
            if self.state == "ready":
                self.discover()

    async def rescan(self) -> list[AdapterInfo]:
        """``POST /adapters/rescan``: load every complete adapter folder the volume has gained."""
        self.require_ready()
        return await asyncio.to_thread(self.discover, settled=False)

    async def unload_adapter(self, name: str) -> None:
        self.require_ready()
        async with self._lock_for(name):
            await asyncio.to_thread(self.holder.remove_adapter, name)
        self.metrics.adapters_loaded.set(len(self.holder.adapters()))
