"""The micro-batcher on its own: batching, the adaptive window, failure isolation, admission."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest

from shared.batching import BatchSettings, MicroBatcher
from shared.errors import Overloaded


class Recorder:
    """``run_batch`` that doubles numbers, records batch sizes, fails on -1, can be held on a gate."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items: Sequence[int]) -> list[int]:
        self.gate.wait(10)
        self.sizes.append(len(items))
        if -1 in items:
            raise ValueError("bad item")
        return [2 * i for i in items]


def test_a_lone_request_does_not_wait_out_the_window() -> None:
    rec = Recorder()
    batcher = MicroBatcher(rec, BatchSettings(max_batch_size=8, max_wait_ms=60_000, max_queue=16))
    batcher.start()
    try:
        # a 60 s window would blow the 10 s bound: a lone request runs at once
        assert asyncio.run(asyncio.wait_for(batcher.submit(21), timeout=10)) == 42
        assert rec.sizes == [1]
    finally:
        batcher.stop()


def test_overlapping_requests_are_batched_and_failures_stay_alone() -> None:
    rec = Recorder()
    batcher = MicroBatcher(rec, BatchSettings(max_batch_size=8, max_wait_ms=20, max_queue=16))
    batcher.start()

    async def scenario() -> list[int | BaseException]:
        rec.gate.clear()
        first = asyncio.create_task(batcher.submit(0))  # runs alone, held on the gate
        await asyncio.sleep(0.1)
        rest = [asyncio.create_task(batcher.submit(i)) for i in (1, 2, -1, 3, 4, 5)]
        await asyncio.sleep(0.1)
        rec.gate.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    try:
        results = asyncio.run(scenario())
    finally:
        batcher.stop()
    assert results[:3] == [0, 2, 4] and results[4:] == [6, 8, 10]
    assert isinstance(results[3], ValueError)  # the bad item failed alone
    assert rec.sizes[0] == 1 and max(rec.sizes) > 1, rec.sizes  # the queued items shared batches


def test_a_full_queue_is_overloaded_with_retry_after() -> None:
    rec = Recorder()
    batcher = MicroBatcher(rec, BatchSettings(max_batch_size=1, max_wait_ms=0, max_queue=2))
    batcher.start()

    async def scenario() -> None:
        rec.gate.clear()
        held = [asyncio.create_task(batcher.submit(0))]
        await asyncio.sleep(0.1)  # taken by the thread, which now waits on the gate
        held += [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]  # the queue is now full
        await asyncio.sleep(0.1)
        with pytest.raises(Overloaded) as err:
            await batcher.submit(9)
        assert err.value.retry_after >= 1
        rec.gate.set()
        assert await asyncio.gather(*held) == [0, 2, 4]

    try:
        asyncio.run(scenario())
    finally:
        batcher.stop()


def test_an_expired_item_is_not_run() -> None:
    from shared.errors import WorkerTimeout

    rec = Recorder()
    batcher = MicroBatcher(rec, BatchSettings(max_batch_size=4, max_wait_ms=0, max_queue=8))
    batcher.start()
    try:
        with pytest.raises(WorkerTimeout):
            asyncio.run(batcher.submit(1, deadline=time.monotonic() - 1))
        assert rec.sizes == []
    finally:
        batcher.stop()
