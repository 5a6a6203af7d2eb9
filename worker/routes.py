"""Worker HTTP routes: validate, call the service, return (the HTTP contract: README "HTTP API").

With ``MOLE_WORKER_TOKEN`` set every route but health needs it (``/info`` names model paths);
``/metrics`` takes the metrics token too. Health stays open for probes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from shared.errors import InvalidInput
from shared.http import metrics_response
from shared.schemas import (
    DEADLINE_HEADER,
    NDJSON,
    AdapterInfo,
    InferRequest,
    InferResponse,
    LoadAdapterRequest,
    WorkerInfo,
    WorkerReady,
)
from worker.deps import MetricsAuth, Service, WorkerAuth

router = APIRouter()


def _deadline(request: Request, default_s: float) -> float:
    """Monotonic deadline from ``X-Mole-Deadline-Ms`` (remaining budget), else the default timeout."""
    raw = request.headers.get(DEADLINE_HEADER)
    if raw is None:
        return time.monotonic() + default_s
    try:
        budget_ms = float(raw)
    except ValueError:
        raise InvalidInput(f"{DEADLINE_HEADER} must be a number of milliseconds") from None
    return time.monotonic() + max(0.0, budget_ms) / 1000.0


@router.post("/infer", response_model=InferResponse, dependencies=[WorkerAuth])
async def infer(body: InferRequest, request: Request, service: Service) -> InferResponse:
    deadline = _deadline(request, service.settings.request_timeout_s)
    return await service.infer(body, deadline=deadline)


@router.post("/infer/stream", dependencies=[WorkerAuth])
async def infer_stream(body: InferRequest, request: Request, service: Service) -> StreamingResponse:
    """Newline-delimited :class:`InferStreamEvent` lines; the status is sent with the first token,
    so everything that fails before it is an ordinary error answer."""
    deadline = _deadline(request, service.settings.request_timeout_s)
    stream = await service.open_stream(body, deadline=deadline)

    async def lines() -> AsyncIterator[bytes]:
        try:
            async with contextlib.aclosing(stream.events()) as events:
                async for event in events:
                    yield event.model_dump_json(exclude_none=True).encode() + b"\n"
        finally:  # the coordinator went away (or the stream ended): the row stops at its next token
            stream.close()

    return StreamingResponse(lines(), media_type=NDJSON)


@router.get("/health/live")
async def live() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/health/ready", response_model=WorkerReady, responses={503: {"model": WorkerReady}})
async def ready(service: Service) -> Response:
    body = service.ready_body()
    status = 200 if service.state == "ready" else 503
    return JSONResponse(body.model_dump(), status_code=status)


@router.get("/info", response_model=WorkerInfo, dependencies=[WorkerAuth])
async def info(service: Service) -> WorkerInfo:
    return service.info()


@router.get("/metrics", dependencies=[MetricsAuth])
async def metrics(service: Service) -> Response:
    service.metrics.queue_depth.set(service.batcher.queue_depth)
    service.metrics.observe_gpu(service.holder.device)
    return metrics_response(service.metrics.registry)


@router.post("/adapters", response_model=AdapterInfo, dependencies=[WorkerAuth])
async def load_adapter(body: LoadAdapterRequest, service: Service) -> AdapterInfo:
    return await service.load_adapter(body.name, body.path)


@router.post("/adapters/rescan", response_model=list[AdapterInfo], dependencies=[WorkerAuth])
async def rescan_adapters(service: Service) -> list[AdapterInfo]:
    """Load every adapter folder dropped into the worker's ``discover`` folder (the poll does it
    too, every ``MOLE_DISCOVER_INTERVAL_S``)."""
    return await service.rescan()


@router.delete("/adapters/{name}", dependencies=[WorkerAuth])
async def unload_adapter(name: str, service: Service) -> dict[str, str]:
    await service.unload_adapter(name)
    return {"status": "unloaded", "adapter": name}
