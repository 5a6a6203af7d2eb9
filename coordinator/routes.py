"""The coordinator's HTTP routes: validate, call the serving object, return.

``public``, ``admin`` and ``internal`` (``/workers``: internal URLs, states, last errors) require an
API key when keys are configured; ``/metrics`` requires the metrics token or an API key when either
is configured; ``ops`` (health) stays open for probes. The OpenAPI schema and its pages are behind
the API key too (``coordinator/app.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from coordinator.deps import ApiKeyDep, MetricsDep, RequestIdDep, ServiceDep
from coordinator.openai_compat import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ModelList,
    chat_completion,
    chat_completion_stream,
    model_list,
)
from coordinator.outcomes import Classified
from shared.http import metrics_response
from shared.schemas import (
    ClassifyBatchRequest,
    ClassifyBatchResponse,
    ClassifyRequest,
    ClassifyResponse,
    InferWebRequest,
    InferWebResponse,
    RouteCandidate,
    error_responses,
)

ROUTER_VERSION_HEADER = "X-Mole-Router-Version"  # sha256 of the router adapter in force
ROUTE_TOP_HEADER = "X-Mole-Route-Top"  # "adapter=probability,..." of the router's top labels

public = APIRouter(
    dependencies=[ApiKeyDep], responses=error_responses(400, 401, 404, 413, 422, 429, 503, 504)
)
admin = APIRouter(prefix="/admin", dependencies=[ApiKeyDep], responses=error_responses(400, 401))
internal = APIRouter(dependencies=[ApiKeyDep], responses=error_responses(401))
ops = APIRouter()


def _route_top(top: list[RouteCandidate]) -> dict[str, str]:
    """The ``X-Mole-Route-Top`` header of a routed request (none for an explicit expert)."""
    return {ROUTE_TOP_HEADER: ",".join(f"{c.adapter}={c.probability:.4f}" for c in top)} if top else {}


def _route_headers(response: Response, served: Classified) -> None:
    response.headers[ROUTER_VERSION_HEADER] = served.router_version
    response.headers.update(_route_top(served.response.top_k))


@public.post("/classify", response_model=ClassifyResponse)
async def classify(
    body: ClassifyRequest, service: ServiceDep, rid: RequestIdDep, response: Response
) -> ClassifyResponse:
    """Route (or take ``expert``), run on a worker, return the output with how it was served."""
    served = await service.classify(body, rid)
    _route_headers(response, served)
    return served.response


@public.post("/classify/batch", response_model=ClassifyBatchResponse)
async def classify_batch(
    body: ClassifyBatchRequest, service: ServiceDep, rid: RequestIdDep, response: Response
) -> ClassifyBatchResponse:
    """Items run concurrently; each result is ``ok`` with a result or not ``ok`` with its error."""
    result = await service.classify_batch(body, rid)
    response.headers[ROUTER_VERSION_HEADER] = service.router_version
    return result


@public.get("/classify/stats")
async def classify_stats(service: ServiceDep) -> dict[str, Any]:
    """Counts per adapter, routed_by and mode, errors by code, shadow-mode router agreement."""
    return service.stats_snapshot()


@public.post("/infer_web", response_model=InferWebResponse)
async def infer_web(
    body: InferWebRequest, service: ServiceDep, rid: RequestIdDep, response: Response
) -> InferWebResponse:
    """The original single-server API: ``expert`` is a label index; answers ``task_output``."""
    req = ClassifyRequest(image_b64=body.image_b64, prompt=body.prompt, expert=body.expert)
    served = await service.classify(req, rid)
    _route_headers(response, served)
    r = served.response
    return InferWebResponse(
        task_output=r.output,
        routed_adapter=r.adapter,
        label=r.label,
        confidence=r.confidence,
        worker_id=r.worker_id,
        mode=r.mode,
        request_id=r.request_id,
    )


@public.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(
    body: ChatCompletionRequest, service: ServiceDep, rid: RequestIdDep, response: Response
) -> Any:
    """OpenAI-compatible: ``model`` is ``auto`` or an adapter; the image is a ``data:`` URL part;
    ``stream: true`` answers server-sent events as the worker generates."""
    if body.stream:
        return await _event_stream(service, body, rid)
    completion, served = await chat_completion(service, body, rid)
    _route_headers(response, served)
    return completion


async def _event_stream(service: ServiceDep, body: ChatCompletionRequest, rid: str) -> StreamingResponse:
    """The SSE answer; the request's worker slot is freed when the stream ends or its client leaves
    (whichever of the body's ``finally`` and the background task runs first closes it)."""
    scope = contextlib.AsyncExitStack()
    stream, events = await scope.enter_async_context(chat_completion_stream(service, body, rid))

    async def body_then_close() -> AsyncIterator[bytes]:
        try:
            async for chunk in events:
                yield chunk
        finally:
            await scope.aclose()

    headers = {
        ROUTER_VERSION_HEADER: stream.router_version,
        **_route_top(stream.plan.decision.top_k),
        "Cache-Control": "no-cache",
    }
    return StreamingResponse(
        body_then_close(),
        media_type="text/event-stream",
        headers=headers,
        background=BackgroundTask(scope.aclose),
    )


@public.get("/v1/models", response_model=ModelList)
async def list_models(service: ServiceDep) -> ModelList:
    return model_list(service.adapter_names(), service.started)


@admin.post("/reload")
async def reload_mapping(service: ServiceDep) -> dict[str, Any]:
    """Re-read and validate the mapping file; a bad one is a 400 and the old one stays in force."""
    return await service.reload("admin")


@internal.get("/workers")
async def workers(service: ServiceDep) -> dict[str, Any]:
    """Every worker with url, mode, adapters, state, ejection, last probe time and latency."""
    return {"workers": service.workers_view()}


@ops.get("/health/live")
async def live() -> dict[str, str]:
    return {"status": "alive"}


@ops.get("/health/ready")
async def ready(service: ServiceDep) -> JSONResponse:
    """200 once the router is loaded and at least one worker is up; 503 otherwise."""
    ok, body = service.readiness()
    return JSONResponse(body, status_code=200 if ok else 503)


@ops.get("/metrics", dependencies=[MetricsDep])
async def metrics(service: ServiceDep) -> Response:
    return metrics_response(service.metrics_registry)
