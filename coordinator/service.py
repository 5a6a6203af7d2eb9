"""The coordinator's serving object: classify (validate, route, dispatch, answer).

Route handlers call :class:`CoordinatorService`. It owns the parts a classify request passes
through and nothing else: the active mapping and router (:mod:`coordinator.active`, which also
handles reloads), the dispatcher (:mod:`coordinator.dispatch`) and the request statistics
(:mod:`coordinator.stats`). What a request becomes (its plan, its answer, its stream) is in
:mod:`coordinator.outcomes`. Protocol translation (OpenAI, ``/infer_web``) happens in the routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from coordinator.active import Active, ActiveMapping
from coordinator.backends import Backend, HttpBackend, ms_since
from coordinator.dispatch import Dispatcher
from coordinator.metrics import CoordinatorMetrics
from coordinator.outcomes import Classified, ClassifyStream, Planned, Sampling
from coordinator.router import RouterModelProvider, decide, text_only_decision
from coordinator.stats import RequestStats
from coordinator.vllm_backend import VllmBackend
from coordinator.vllm_router import VllmRouter
from shared.errors import AdapterNotFound, MoleError, PayloadTooLarge
from shared.images import PixelBudget, image_pixels, scan_image
from shared.limits import check_text_limits
from shared.mapping import MoleMapping, WorkerSpec
from shared.schemas import (
    BatchItemError,
    ClassifyBatchItem,
    ClassifyBatchRequest,
    ClassifyBatchResponse,
    ClassifyRequest,
    InferRequest,
)
from shared.settings import Settings

logger = logging.getLogger(__name__)


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
        self.started = int(time.time())  # the OpenAI "created" of every model served
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
        client = httpx.AsyncClient(  # calls set their own timeouts (the policy's, the deadline's)
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
            timeout=httpx.Timeout(120.0, connect=5.0),
        )
        active = ActiveMapping(settings, mapping_path, metrics, router_model=router_model, client=client)
        try:
            first = await active.load()
        except BaseException:
            await client.aclose()
            raise
        token = settings.worker_token_value()
        local = dict(backends or {})

        def backend_for(spec: WorkerSpec) -> Backend:
            if spec.engine == "vllm" and spec.id not in local:  # adapters' defaults: the mapping in force
                return VllmBackend(spec, client, token=token, adapter_spec=active.adapter_spec)
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
        """Every adapter served: the mapping's, the base model when served, and those the workers
        discovered on their volumes, sorted."""
        mapping = self.active.current.mapping
        names = set(mapping.adapters) | self.dispatcher.discovered()
        if mapping.serve_base_as is not None:
            names.add(mapping.serve_base_as)
        return sorted(names)

    def workers_view(self) -> list[dict[str, Any]]:
        """``GET /workers`` rows."""
        return self.dispatcher.view()

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, body): ready once the router is loaded (on a vLLM worker: that worker is up) and
        at least one worker is up."""
        replicas = self.dispatcher.replicas()
        router = self.active.current.router
        ready = router.loaded and self.dispatcher.any_up()
        if isinstance(router, VllmRouter):
            ready = ready and any(r.spec.id == router.worker_id and r.state == "up" for r in replicas)
        body = {
            "status": "ready" if ready else "waiting_for_workers",
            "router_version": self.router_version,
            "workers_up": sum(r.state == "up" for r in replicas),
            "workers": len(replicas),
        }
        return ready, body

    def stats_snapshot(self) -> dict[str, Any]:
        return self.stats.snapshot(self.active.current.mapping.router.shadow)

    # ---- classify ------------------------------------------------------------------------------
    async def classify(
        self, req: ClassifyRequest, request_id: str, *, sampling: Sampling | None = None
    ) -> Classified:
        """Validate, route (or take the explicit expert), dispatch; errors are counted and re-raised."""
        t0 = time.perf_counter()
        try:
            return await self._classify(self.active.current, req, request_id, sampling or Sampling(), t0)
        except MoleError as exc:
            self.stats.failed(exc.code, exc.status, request_id, ms_since(t0))
            raise

    async def _classify(
        self, active: Active, req: ClassifyRequest, request_id: str, sampling: Sampling, t0: float
    ) -> Classified:
        plan = await self._plan(active, req, request_id, sampling, t0)
        served = await self.dispatcher.dispatch(
            plan.infer, prefer_merged=plan.prefer_merged, request_id=request_id, deadline=plan.deadline
        )
        answer = served.response
        response = plan.response(
            served.worker_id,
            answer,
            path=served.path,
            degraded=served.degraded,
            timings_ms={
                "route": plan.route_ms,
                "dispatch": served.dispatch_ms,
                "worker": float(answer.timings_ms.get("total", served.worker_ms)),
                "total": ms_since(t0),
            },
        )
        self.stats.served(response)
        return Classified(response, active.router.version, answer.tokens_generated)

    @contextlib.asynccontextmanager
    async def classify_stream(
        self, req: ClassifyRequest, request_id: str, *, sampling: Sampling | None = None
    ) -> AsyncIterator[ClassifyStream]:
        """:meth:`classify`, streamed: validate, route, and wait for the first token (errors until
        then are raised, as :meth:`classify` raises them); the block reads the events. Leaving the
        block early (a client gone) frees the worker's slot and stops its row."""
        t0 = time.perf_counter()
        active = self.active.current
        try:
            plan = await self._plan(active, req, request_id, sampling or Sampling(), t0)
            opened = self.dispatcher.stream(
                plan.infer, prefer_merged=plan.prefer_merged, request_id=request_id, deadline=plan.deadline
            )
            served = await opened.__aenter__()
        except MoleError as exc:
            self.stats.failed(exc.code, exc.status, request_id, ms_since(t0))
            raise
        try:
            yield ClassifyStream(self, plan, served, active.router.version, t0)
        except BaseException as exc:
            if not await opened.__aexit__(type(exc), exc, exc.__traceback__):
                raise
        else:
            await opened.__aexit__(None, None, None)

    def resolve_expert(self, mapping: MoleMapping, expert: str | int) -> str:
        """An explicit ``expert``: an adapter or label of the mapping, the served base model, or an
        adapter a worker discovered on its volume (by name). ``AdapterNotFound`` otherwise."""
        try:
            return mapping.adapter_for(expert)
        except AdapterNotFound as exc:
            name = str(expert).strip()
            if name in self.dispatcher.discovered():
                return name
            exc.details["discovered"] = sorted(self.dispatcher.discovered())
            raise

    async def _plan(
        self, active: Active, req: ClassifyRequest, request_id: str, sampling: Sampling, t0: float
    ) -> Planned:
        s = self.settings
        deadline = time.monotonic() + s.request_timeout_s
        mapping = active.mapping
        check_text_limits(s, req.prompt, None)  # the answer's cap is the adapter's: the worker checks it
        explicit = self.resolve_expert(mapping, req.expert) if req.expert is not None else None
        scores = None
        if req.image_b64 is None:
            decision = text_only_decision(mapping, explicit)
        else:
            # header-only check first, so that a bad or oversized image fails before any decoding
            scanned = await asyncio.to_thread(
                scan_image, req.image_b64, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels
            )
            router = active.router
            if explicit is None or mapping.router.shadow:
                if isinstance(router, VllmRouter):  # the image goes as received: nothing decoded here
                    scores = await router.score_b64(req.image_b64, active.config, deadline=deadline)
                else:
                    with self.pixels.hold(
                        scanned.pixels
                    ):  # the decoded image lives for the routing forward only
                        image = await asyncio.to_thread(scanned.decode)
                        try:
                            scores = await router.score(image, active.config, deadline=deadline)
                        finally:
                            del image
            decision = decide(mapping, scores, explicit)
        route_ms = ms_since(t0)
        self.stats.route(decision, shadow=mapping.router.shadow)
        infer = InferRequest(
            image_b64=req.image_b64,  # forwarded as received; the worker decodes it itself
            prompt=req.prompt,
            adapter=decision.adapter,
            system_prompt=req.system_prompt,
            history=list(sampling.history),
            stop=req.stop,
            max_new_tokens=req.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
        )
        prefer = req.prefer_merged if req.prefer_merged is not None else mapping.dispatch.prefer_merged
        return Planned(request_id, decision, infer, prefer, deadline, route_ms)

    def _pixels_of(self, image_b64: str) -> int:
        s = self.settings
        return image_pixels(image_b64, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels)

    async def _check_request_pixels(self, req: ClassifyBatchRequest) -> None:
        """413 when the batch's images together exceed ``max_request_pixels`` (headers only, before
        any pixel is decoded); items whose image is bad are left to fail on their own."""
        limit = self.settings.max_request_pixels

        def total() -> int:
            pixels = 0
            for item in req.items:
                if item.image_b64 is None:
                    continue
                try:
                    pixels += self._pixels_of(item.image_b64)
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
