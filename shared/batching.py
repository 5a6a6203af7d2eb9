"""A micro-batcher: concurrent async callers, one dedicated compute thread, a bounded queue.

Callers ``await submit(item)``; the compute thread takes the oldest item, gathers more items with
the same group key until ``max_batch_size`` or ``max_wait_ms`` after the first, and calls
``run_batch(items)`` off the event loop. The window applies only while requests overlap (the last
batch had more than one item): a lone client pays no wait, and items that arrive while a batch runs
form the next one. Results go back to each caller's future. When a batch
raises, each of its items is retried alone, so one bad request fails by itself and the thread lives
on. A full queue raises :class:`~shared.errors.Overloaded` at once (callers answer 429), and an item
whose deadline passed while queued is failed without running.

Used by the worker (generation) and the coordinator's router (one forward per batch).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from shared.errors import Overloaded, WorkerTimeout

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchSettings:
    max_batch_size: int = 8  # rows per forward
    max_wait_ms: float = 5.0  # how long the first item waits for company (only while requests overlap)
    max_queue: int = 64  # items waiting (not running) before submit answers Overloaded


@dataclass(eq=False)  # identity: queue removal must not compare items (images)
class _Pending(Generic[T]):
    item: T
    key: Hashable
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # time.monotonic() after which the item is not worth running


BatchObserver = Callable[[int, float], None]  # (batch size, seconds) after each batch


class MicroBatcher(Generic[T, R]):
    """Groups concurrent items into batches for ``run_batch`` on one dedicated thread."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[T]], Sequence[R]],
        settings: BatchSettings,
        *,
        key: Callable[[T], Hashable] = lambda _: None,
        name: str = "batcher",
        on_batch: BatchObserver | None = None,
    ):
        self._run_batch = run_batch
        self.settings = settings
        self._key = key
        self.name = name
        self._on_batch = on_batch
        self._queue: deque[_Pending[T]] = deque()
        self._cond = threading.Condition()
        self._running = 0  # items inside run_batch now
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._service_ema = 0.05  # seconds per batch, smoothed: feeds Retry-After
        self._last_batch_size = 1  # > 1 means requests overlap: worth waiting for company

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish queued and running items (bounded by ``timeout``), then stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:  # whatever is left did not make it within the drain timeout
            leftover = list(self._queue)
            self._queue.clear()
        for p in leftover:
            self._resolve(p, exc=Overloaded("shutting down", retry_after=1.0))

    # ---- introspection ---------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return len(self._queue) + self._running

    # ---- submit ----------------------------------------------------------------------------
    async def submit(self, item: T, *, deadline: float | None = None) -> R:
        """Queue ``item`` and wait for its result; raises ``Overloaded`` when the queue is full."""
        loop = asyncio.get_running_loop()
        pending = _Pending(item, self._key(item), loop.create_future(), loop, deadline=deadline)
        with self._cond:
            if self._stopping:
                raise Overloaded(f"{self.name} is shutting down", retry_after=1.0)
            if len(self._queue) >= self.settings.max_queue:
                raise Overloaded(
                    f"queue full ({self.settings.max_queue} waiting)", retry_after=self._retry_after()
                )
            self._queue.append(pending)
            self._cond.notify()
        try:
            return await pending.future
        except asyncio.CancelledError:  # the caller went away: a queued item never runs
            with self._cond:
                if pending in self._queue:
                    self._queue.remove(pending)
            raise

    def _retry_after(self) -> float:
        batches_ahead = len(self._queue) / max(1, self.settings.max_batch_size) + 1
        return max(1.0, batches_ahead * self._service_ema)

    # ---- compute thread --------------------------------------------------------------------
    def _take_batch(self) -> list[_Pending[T]] | None:
        s = self.settings
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch = [first]
            # Wait for company only while requests overlap (the last batch had several): one client
            # at a time then pays no batching window, and concurrent load still forms full batches.
            wait_ms = s.max_wait_ms if self._last_batch_size > 1 else 0.0
            until = time.monotonic() + wait_ms / 1000.0
            while len(batch) < s.max_batch_size:
                for p in list(self._queue):
                    if p.key == first.key:
                        self._queue.remove(p)
                        batch.append(p)
                        if len(batch) >= s.max_batch_size:
                            break
                remaining = until - time.monotonic()
                if len(batch) >= s.max_batch_size or remaining <= 0 or self._stopping:
                    break
                self._cond.wait(remaining)
            self._running = len(batch)
            self._last_batch_size = len(batch)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            try:
                self._serve(batch)
            finally:
                del batch  # items (decoded images) must not outlive their batch while the queue is idle
                with self._cond:
                    self._running = 0

    def _serve(self, batch: list[_Pending[T]]) -> None:
        now = time.monotonic()
        live = []
        for p in batch:
            if p.deadline is not None and now > p.deadline:
                self._resolve(p, exc=WorkerTimeout("deadline passed while queued"))
            else:
                live.append(p)
        if live:
            self._run(live)

    def _run(self, batch: list[_Pending[T]]) -> None:
        t0 = time.perf_counter()
        try:
            results = list(self._run_batch([p.item for p in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        except Exception as exc:
            if len(batch) == 1:
                logger.warning("%s: request failed: %s", self.name, exc.__class__.__name__, exc_info=True)
                self._resolve(batch[0], exc=exc)
                return
            logger.warning("%s: batch of %d failed (%s); retrying items alone", self.name, len(batch), exc)
            for p in batch:
                self._run([p])
            return
        elapsed = time.perf_counter() - t0
        self._service_ema = 0.8 * self._service_ema + 0.2 * elapsed
        if self._on_batch is not None:
            self._on_batch(len(batch), elapsed)
        for p, r in zip(batch, results, strict=True):
            self._resolve(p, result=r)

    @staticmethod
    def _resolve(p: _Pending[Any], *, result: Any = None, exc: BaseException | None = None) -> None:
        def settle() -> None:
            if p.future.done():  # the caller went away (cancelled)
                return
            if exc is not None:
                p.future.set_exception(exc)
            else:
                p.future.set_result(result)

        try:
            p.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the caller's loop is closed
            pass
