"""The coordinator's serving object: classify (validate, route, dispatch, answer).

Route handlers call :class:`CoordinatorService`. It owns the parts a classify request passes
through and nothing else: the active mapping and router (:mod:`coordinator.active`, which also
handles reloads), the dispatcher (:mod:`coordinator.dispatch`) and the request statistics
(:mod:`coordinator.stats`). Protocol translation (OpenAI, ``/infer_web``) happens in the routes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from coordinator.active import Active, ActiveMapping
from coordinator.backends import Backend, HttpBackend
from coordinator.dispatch import Dispatcher
from coordinator.metrics import CoordinatorMetrics
from coordinator.router import RouterModelProvider, decide
from coordinator.stats import RequestStats
from shared.errors import MoleError, PayloadTooLarge
from shared.images import PixelBudget, decode_image, image_pixels
from shared.limits import check_text_limits
from shared.mapping import WorkerSpec
from shared.schemas import (
    BatchItemError,
    ClassifyBatchItem,
    ClassifyBatchRequest,
    ClassifyBatchResponse,
    ClassifyRequest,
    ClassifyResponse,
    InferRequest,
)
from shared.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """Decoding options forwarded to the worker (``None``: the worker's default, greedy)."""

    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None


@dataclass
class Classified:
    """One answered classify request plus what the OpenAI and header layers need."""

    response: ClassifyResponse
    router_version: str
    tokens_generated: int


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)


class CoordinatorService:
    """Everything the coordinator's routes need, built by :meth:`start` and closed by :meth:`aclose`."""

    def __init__(
        self,
        settings: Settings,
        active: ActiveMapping,
        dispatcher: Dispatcher,
        metrics: CoordinatorMetrics,
        client: httpx.AsyncClient,
    ):
        self.settings = settings
        self.active = active
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.stats = RequestStats(metrics)
        self._client = client
        self.pixels = PixelBudget(settings.max_pixels_in_flight)  # decoded images held for routing
        self._prober: asyncio.Task[None] | None = None
        active.on_swap = dispatcher.update

    # ---- lifecycle -----------------------------------------------------------------------------
    @classmethod
    async def start(
        cls,
        settings: Settings,
        mapping_path: Path,
        *,
        backends: Mapping[str, Backend] | None = None,
        router_model: RouterModelProvider | None = None,
    ) -> CoordinatorService:
        """Load the mapping (paths checked) and the router, open the worker client, start the prober.

        ``backends`` maps worker ids to in-process backends used instead of HTTP, and
        ``router_model`` lends every router (this one and those of later reloads) a shared model
        instead of loading one (monolithic mode).
        """
        metrics = CoordinatorMetrics()
        active = ActiveMapping(settings, mapping_path, metrics, router_model=router_model)
        first = await active.load()
        policy = first.mapping.dispatch
        client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
            timeout=httpx.Timeout(policy.request_timeout_s, connect=policy.connect_timeout_s),
        )
        token = settings.worker_token_value()
        local = dict(backends or {})

        def backend_for(spec: WorkerSpec) -> Backend:
            return local.get(spec.id) or HttpBackend(spec, client, token=token)

        dispatcher = Dispatcher(first.mapping, backend_for, metrics, max_waiting=settings.max_waiting)
        self = cls(settings, active, dispatcher, metrics, client)
        self._prober = asyncio.create_task(
            dispatcher.prober.run(lambda: self.active.current.mapping.dispatch.probe_interval_s),
            name="worker-prober",
        )
        logger.info(
            "coordinator started",
            extra={
                "adapters": len(first.mapping.adapters),
                "workers": len(first.mapping.workers),
                "router": first.router.version[:16],
            },
        )
        return self

    async def aclose(self) -> None:
        """Stop the prober and background reloads, close the worker client, stop the router thread."""
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)
        await self._client.aclose()
        await self.active.aclose()

    # ---- views ---------------------------------------------------------------------------------
    @property
    def router_version(self) -> str:
        return self.active.current.router.version

    @property
    def metrics_registry(self) -> CollectorRegistry:
        return self.metrics.registry

    def adapter_names(self) -> list[str]:
        """Every adapter of the mapping in force, sorted."""
        return sorted(self.active.current.mapping.adapters)

    def workers_view(self) -> list[dict[str, Any]]:
        """``GET /workers`` rows."""
        return self.dispatcher.view()

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, body): ready once the router is loaded and at least one worker is up."""
        replicas = self.dispatcher.replicas()
        ready = self.active.current.router.loaded and self.dispatcher.any_up()
        body = {
            "status": "ready" if ready else "waiting_for_workers",
            "router_version": self.router_version,
            "workers_up": sum(r.state == "up" for r in replicas),
            "workers": len(replicas),
        }
        return ready, body

    def stats_snapshot(self) -> dict[str, Any]:
        return self.stats.snapshot(self.active.current.mapping.router.shadow)

    async def count_prompt_tokens(self, prompt: str) -> int:
        """Tokens of ``prompt`` in the base tokenizer (the text only, not the image)."""
        return await asyncio.to_thread(self.active.current.router.count_tokens, prompt)

    # ---- classify ------------------------------------------------------------------------------
    async def classify(
        self, req: ClassifyRequest, request_id: str, *, sampling: Sampling | None = None
    ) -> Classified:
        """Validate, route (or take the explicit expert), dispatch; errors are counted and re-raised."""
        t0 = time.perf_counter()
        try:
            return await self._classify(self.active.current, req, request_id, sampling or Sampling(), t0)
        except MoleError as exc:
            self.stats.failed(exc.code, exc.status, request_id, _ms(t0))
            raise

    async def _classify(
        self, active: Active, req: ClassifyRequest, request_id: str, sampling: Sampling, t0: float
    ) -> Classified:
        s = self.settings
        deadline = time.monotonic() + s.request_timeout_s
        mapping = active.mapping
        check_text_limits(s, req.prompt, req.max_new_tokens)
        explicit = mapping.adapter_for(req.expert) if req.expert is not None else None
        scores = None
        if explicit is None or mapping.router.shadow:
            pixels = await asyncio.to_thread(self._pixels_of, req)
            with self.pixels.hold(pixels):  # the decoded image lives for the routing forward only
                image = await asyncio.to_thread(
                    decode_image, req.image_b64, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels
                )
                try:
                    scores = await active.router.score(image, active.config, deadline=deadline)
                finally:
                    del image
        else:  # the worker decodes it; check it here so that a bad image fails before dispatch
            await asyncio.to_thread(self._pixels_of, req)
        decision = decide(mapping, scores, explicit)
        route_ms = _ms(t0)
        self.stats.route(decision, shadow=mapping.router.shadow)

        infer = InferRequest(
            image_b64=req.image_b64,  # forwarded as received; the worker decodes it itself
            prompt=req.prompt,
            adapter=decision.adapter,
            max_new_tokens=req.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
        )
        prefer = req.prefer_merged if req.prefer_merged is not None else mapping.dispatch.prefer_merged
        served = await self.dispatcher.dispatch(
            infer, prefer_merged=prefer, request_id=request_id, deadline=deadline
        )
        answer = served.response
        response = ClassifyResponse(
            request_id=request_id,
            adapter=decision.adapter,
            label=decision.label,
            confidence=decision.confidence,
            routed_by=decision.routed_by,
            worker_id=served.worker_id,
            mode=answer.mode,
            output=answer.output,
            routing_path=[*decision.path, *served.path],
            degraded=served.degraded,
            top_k=decision.top_k,
            timings_ms={
                "route": route_ms,
                "dispatch": served.dispatch_ms,
                "worker": float(answer.timings_ms.get("total", served.worker_ms)),
                "total": _ms(t0),
            },
        )
        self.stats.served(response)
        return Classified(response, active.router.version, answer.tokens_generated)

    def _pixels_of(self, req: ClassifyRequest) -> int:
        s = self.settings
        return image_pixels(req.image_b64, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels)

    async def _check_request_pixels(self, req: ClassifyBatchRequest) -> None:
        """413 when the batch's images together exceed ``max_request_pixels`` (headers only, before
        any pixel is decoded); items whose image is bad are left to fail on their own."""
        limit = self.settings.max_request_pixels

        def total() -> int:
            pixels = 0
            for item in req.items:
                try:
                    pixels += self._pixels_of(item)
                except MoleError:
                    continue
            return pixels

        pixels = await asyncio.to_thread(total)
        if pixels > limit:
            raise PayloadTooLarge(
                f"items: the batch's images have {pixels} pixels together, more than the limit of {limit} "
                "pixels per request; send fewer or smaller images",
                field="items",
                pixels=pixels,
                limit_pixels=limit,
            )

    async def classify_batch(self, req: ClassifyBatchRequest, request_id: str) -> ClassifyBatchResponse:
        """Every item concurrently; a failed item carries its error and does not fail the others.

        The whole batch is refused (413) when its images exceed the per-request pixel budget.
        """
        try:
            await self._check_request_pixels(req)
        except MoleError as exc:
            self.stats.failed(exc.code, exc.status, request_id, 0.0)
            raise
        items = await asyncio.gather(
            *(self._batch_item(item, f"{request_id}-{i}") for i, item in enumerate(req.items))
        )
        return ClassifyBatchResponse(results=list(items))

    async def _batch_item(self, item: ClassifyRequest, request_id: str) -> ClassifyBatchItem:
        try:
            served = await self.classify(item, request_id)
        except MoleError as exc:
            error = BatchItemError(code=exc.code, message=exc.message, status=exc.status)
        except Exception:
            logger.exception("batch item failed", extra={"request_id": request_id})
            error = BatchItemError(code="internal_error", message="internal error", status=500)
        else:
            return ClassifyBatchItem(ok=True, result=served.response)
        return ClassifyBatchItem(ok=False, error=error)

    # ---- reload --------------------------------------------------------------------------------
    async def reload(self, reason: str) -> dict[str, Any]:
        """Re-read the mapping file (see :meth:`ActiveMapping.reload`)."""
        return await self.active.reload(reason)
