"""Hardening units (issue 14): request ids, schema bounds, pixel budgets, the batcher's handling of
cancelled and finished items, cancellation on disconnect, and the worker-answer table's 404."""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from PIL import Image
from pydantic import ValidationError

from shared.batching import BatchSettings, MicroBatcher
from shared.errors import Overloaded, PayloadTooLarge
from shared.http import CancelOnDisconnectMiddleware, RequestIdMiddleware
from shared.images import PixelBudget, image_pixels
from shared.schemas import ClassifyRequest, InferRequest, InferWebRequest
from shared.settings import Settings


def test_a_non_ascii_request_id_is_replaced_by_a_minted_one() -> None:
    app = FastAPI()

    @app.get("/")
    async def root() -> dict[str, str]:
        return {}

    app.add_middleware(RequestIdMiddleware)

    async def go(value: bytes) -> str:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            resp = await client.get("/", headers={"X-Request-Id": value})  # type: ignore[dict-item]
            return resp.headers["x-request-id"]

    assert asyncio.run(go(b"abc-1.2:3_x")) == "abc-1.2:3_x"
    minted = asyncio.run(go("réq-1".encode("latin-1")))
    assert minted.isascii() and len(minted) == 32


@pytest.mark.parametrize("seed", [2**64, 2**63, -(2**63) - 1])
def test_out_of_range_seeds_are_refused_at_the_schema(seed: int) -> None:
    with pytest.raises(ValidationError, match="seed"):
        InferRequest(image_b64="x", prompt="p", adapter="a", seed=seed)
    assert InferRequest(image_b64="x", prompt="p", adapter="a", seed=2**63 - 1).seed == 2**63 - 1


def test_integer_experts_are_bounded() -> None:
    for bad in (-1, 10**30):
        with pytest.raises(ValidationError):
            ClassifyRequest(image_b64="x", prompt="p", expert=bad)
        with pytest.raises(ValidationError):
            InferWebRequest(image_b64="x", prompt="p", expert=bad)
    assert ClassifyRequest(image_b64="x", prompt="p", expert=2).expert == 2


def _png(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (1, 2, 3)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_image_pixels_reads_the_size_without_decoding() -> None:
    assert image_pixels(_png(4000, 3000), max_bytes=8_000_000, max_pixels=16_000_000) == 12_000_000
    with pytest.raises(PayloadTooLarge, match="16000000"):
        image_pixels(_png(5000, 4000), max_bytes=8_000_000, max_pixels=16_000_000)


def test_pixel_budget_refuses_instead_of_queueing_and_gives_back() -> None:
    budget = PixelBudget(100)
    with pytest.raises(PayloadTooLarge):
        with budget.hold(101):
            pass
    with budget.hold(60):
        with pytest.raises(Overloaded) as exc:
            with budget.hold(50):
                pass
        assert exc.value.status == 429 and exc.value.retry_after >= 1
        with budget.hold(40):
            assert budget.in_use == 100
    assert budget.in_use == 0


def test_pixel_limits_must_nest() -> None:
    with pytest.raises(ValidationError, match="max_request_pixels"):
        Settings(max_image_pixels=10, max_request_pixels=5, max_pixels_in_flight=20)
    Settings(max_image_pixels=10, max_request_pixels=10, max_pixels_in_flight=20)


def test_metrics_tokens() -> None:
    assert Settings().metrics_tokens(frozenset()) == frozenset()
    assert Settings(metrics_token="m").metrics_tokens(frozenset({"k"})) == {"m", "k"}


class _Item:
    """A batch item (stands in for a row holding a decoded image)."""


def test_items_do_not_outlive_their_batch() -> None:
    batcher: MicroBatcher[_Item, int] = MicroBatcher(lambda items: [1] * len(items), BatchSettings(4, 0, 8))
    batcher.start()
    item = _Item()
    ref = weakref.ref(item)

    async def go(it: _Item) -> int:
        return await batcher.submit(it)

    assert asyncio.run(go(item)) == 1
    del item
    deadline = time.monotonic() + 5
    while ref() is not None and time.monotonic() < deadline:  # bounded: the thread goes back to waiting
        gc.collect()
        time.sleep(0.02)
    alive = ref() is not None
    batcher.stop()
    assert not alive, "the batcher thread still holds the last batch's items"


def test_a_cancelled_queued_item_never_runs() -> None:
    release = threading.Event()
    seen: list[str] = []

    def run(items: Sequence[str]) -> list[str]:
        seen.extend(items)
        release.wait(10)
        return list(items)

    batcher: MicroBatcher[str, str] = MicroBatcher(run, BatchSettings(1, 0, 8))
    batcher.start()

    async def go() -> str:
        first = asyncio.create_task(batcher.submit("first"))
        while not seen:
            await asyncio.sleep(0.01)
        second = asyncio.create_task(batcher.submit("second"))
        await asyncio.sleep(0.05)
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
        assert batcher.queue_depth == 0
        release.set()
        return await first

    assert asyncio.run(go()) == "first"
    batcher.stop()
    assert seen == ["first"]


def test_a_disconnect_cancels_the_request_and_is_counted() -> None:
    started = asyncio.Event()
    outcome: dict[str, Any] = {}
    counted: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()  # the body
        started.set()
        try:
            await asyncio.sleep(30)  # stands for routing and generation
        except asyncio.CancelledError:
            outcome["cancelled"] = True
            raise

    async def go() -> None:
        messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        await messages.put({"type": "http.request", "body": b"{}", "more_body": False})
        guarded = CancelOnDisconnectMiddleware(app, on_cancel=lambda scope: counted.append(scope["path"]))
        task = asyncio.create_task(guarded({"type": "http", "path": "/classify"}, messages.get, _discard))
        await started.wait()
        await messages.put({"type": "http.disconnect"})
        await asyncio.wait_for(task, 5)

    asyncio.run(go())
    assert outcome == {"cancelled": True} and counted == ["/classify"]


async def _discard(message: dict[str, Any]) -> None:
    pass
