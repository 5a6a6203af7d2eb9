"""The coordinator's serving object: validate, route, dispatch, answer; stats; mapping reload.

Route handlers call :class:`CoordinatorService` and nothing else. The mapping, the router model and
its label configuration are swapped together as one :class:`Active` snapshot, so a request started
before a reload finishes on the mapping it began with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from coordinator.dispatch import Backend, Dispatcher, HttpBackend, WorkerRejected
from coordinator.metrics import CoordinatorMetrics
from coordinator.openai_compat import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    Sampling,
    completion,
    to_classify,
)
from coordinator.router import RouteDecision, Router, RouterConfig, RouterModelProvider, decide
from shared.errors import ConfigError, MoleError
from shared.images import decode_image
from shared.limits import check_text_limits
from shared.mapping import MoleMapping, WorkerSpec, load_mapping
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


class MappingRejected(MoleError):
    """A reloaded mapping is invalid; the previous mapping stays in force."""

    status = 400
    code = "invalid_mapping"


@dataclass(frozen=True)
class Active:
    """The mapping in force with the router model and label configuration that serve it."""

    mapping: MoleMapping
    router: Router
    config: RouterConfig


@dataclass
class Served:
    """One answered classify request plus what the OpenAI and header layers need."""

    response: ClassifyResponse
    router_version: str
    tokens_generated: int


@dataclass
class Stats:
    """In-memory counters behind ``GET /classify/stats`` (since start)."""

    started: float = field(default_factory=time.time)
    requests: int = 0
    by_adapter: Counter[str] = field(default_factory=Counter)
    by_routed_by: Counter[str] = field(default_factory=Counter)
    by_mode: Counter[str] = field(default_factory=Counter)
    degraded: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    confidence_sum: float = 0.0
    confidence_n: int = 0
    shadow_decisions: int = 0
    shadow_agreements: int = 0

    def snapshot(self, shadow_enabled: bool) -> dict[str, Any]:
        return {
            "since": self.started,
            "requests": self.requests,
            "by_adapter": dict(self.by_adapter),
            "by_routed_by": dict(self.by_routed_by),
            "by_mode": dict(self.by_mode),
            "degraded": self.degraded,
            "errors": dict(self.errors),
            "mean_router_confidence": (
                round(self.confidence_sum / self.confidence_n, 4) if self.confidence_n else None
            ),
            "shadow": {
                "enabled": shadow_enabled,
                "decisions": self.shadow_decisions,
                "agreements": self.shadow_agreements,
                "agreement_rate": (
                    round(self.shadow_agreements / self.shadow_decisions, 4)
                    if self.shadow_decisions
                    else None
                ),
            },
        }


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)


class CoordinatorService:
    """Everything the coordinator's routes need, built by :meth:`start` and closed by :meth:`aclose`."""

    def __init__(
        self,
        settings: Settings,
        mapping_path: Path,
        active: Active,
        dispatcher: Dispatcher,
        metrics: CoordinatorMetrics,
        client: httpx.AsyncClient | None = None,
        router_model: RouterModelProvider | None = None,
    ):
        self.settings = settings
        self.mapping_path = mapping_path
        self._active = active
        self.dispatcher = dispatcher
        self.metrics = metrics
        self._router_model = router_model  # lends routers a shared model (monolithic mode)
        self.stats = Stats()
        self._client = client
        self._reload_lock = asyncio.Lock()
        self._prober: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    # ---- lifecycle -----------------------------------------------------------------------------
    @classmethod
    async def start(
        cls,
        settings: Settings,
        mapping_path: Path,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        backends: Mapping[str, Backend] | None = None,
        router_model: RouterModelProvider | None = None,
    ) -> CoordinatorService:
        """Load the mapping (paths checked) and the router, open the worker client, start the prober.

        ``backends`` maps worker ids to in-process backends used instead of HTTP, and
        ``router_model`` lends every router (this one and those of later reloads) a shared model
        instead of loading one (monolithic mode).
        """
        mapping = await asyncio.to_thread(load_mapping, mapping_path, check_paths=True)
        metrics = CoordinatorMetrics()
        router = Router(
            mapping.base_model, mapping.router.adapter, settings, metrics, model_provider=router_model
        )
        await asyncio.to_thread(router.load)
        config = router.config_for(mapping.router)
        client = httpx.AsyncClient(
            transport=transport,
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
            timeout=httpx.Timeout(
                mapping.routing.request_timeout_s, connect=mapping.routing.connect_timeout_s
            ),
        )
        token = settings.worker_token_value()

        local = dict(backends or {})

        def backend_for(spec: WorkerSpec) -> Backend:
            return local.get(spec.id) or HttpBackend(spec, client, token=token)

        dispatcher = Dispatcher(mapping, backend_for, metrics, max_waiting=settings.max_waiting)
        self = cls(
            settings, mapping_path, Active(mapping, router, config), dispatcher, metrics, client, router_model
        )
        self._prober = asyncio.create_task(
            dispatcher.run_prober(lambda: self.mapping.routing.probe_interval_s), name="worker-prober"
        )
        logger.info(
            "coordinator started",
            extra={
                "adapters": len(mapping.adapters),
                "workers": len(mapping.workers),
                "router": router.version[:16],
            },
        )
        return self

    async def aclose(self) -> None:
        """Stop the prober and background reloads, close the worker client, stop the router thread."""
        tasks = [t for t in (self._prober, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
        await asyncio.to_thread(self._active.router.stop, self.settings.drain_timeout_s)

    # ---- views ---------------------------------------------------------------------------------
    @property
    def mapping(self) -> MoleMapping:
        return self._active.mapping

    @property
    def router_version(self) -> str:
        return self._active.router.version

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, body): ready once the router is loaded and at least one worker is up."""
        up = sum(r.state == "up" for r in self.dispatcher.replicas())
        ready = self._active.router.loaded and self.dispatcher.any_up()
        body = {
            "status": "ready" if ready else "waiting_for_workers",
            "router_version": self.router_version,
            "workers_up": up,
            "workers": len(self.dispatcher.replicas()),
        }
        return ready, body

    def stats_snapshot(self) -> dict[str, Any]:
        return self.stats.snapshot(self.mapping.router.shadow)

    # ---- classify ------------------------------------------------------------------------------
    async def classify(
        self, req: ClassifyRequest, request_id: str, *, sampling: Sampling | None = None
    ) -> Served:
        """Validate, route (or take the explicit expert), dispatch; errors are counted and re-raised."""
        t0 = time.perf_counter()
        try:
            return await self._classify(self._active, req, request_id, sampling or Sampling(), t0)
        except (MoleError, WorkerRejected) as exc:
            metric_code = f"worker_{exc.status}" if isinstance(exc, WorkerRejected) else exc.code
            self.stats.errors[exc.code] += 1
            self.metrics.errors.labels(metric_code).inc()
            logger.info(
                "request failed",
                extra={
                    "request_id": request_id,
                    "code": exc.code,
                    "status": exc.status,
                    "latency_ms": _ms(t0),
                },
            )
            raise

    def _check_limits(self, req: ClassifyRequest) -> None:
        check_text_limits(self.settings, req.prompt, req.max_new_tokens)

    async def _classify(
        self, active: Active, req: ClassifyRequest, request_id: str, sampling: Sampling, t0: float
    ) -> Served:
        deadline = time.monotonic() + self.settings.request_timeout_s
        mapping = active.mapping
        self._check_limits(req)
        explicit = mapping.adapter_for(req.expert) if req.expert is not None else None
        s = self.settings
        image = await asyncio.to_thread(
            decode_image, req.image_b64, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels
        )
        scores = None
        if explicit is None or mapping.router.shadow:
            scores = await active.router.score(image, active.config, deadline=deadline)
        decision = decide(mapping, scores, explicit)
        route_ms = _ms(t0)
        self._observe_route(mapping, decision)

        infer = InferRequest(
            image_b64=req.image_b64,  # forwarded as received; the worker decodes it itself
            prompt=req.prompt,
            adapter=decision.adapter,
            max_new_tokens=req.max_new_tokens,
            **sampling.model_dump(),
        )
        prefer = req.prefer_merged if req.prefer_merged is not None else mapping.routing.prefer_merged
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
        self._record_success(response)
        return Served(response, active.router.version, answer.tokens_generated)

    def _observe_route(self, mapping: MoleMapping, decision: RouteDecision) -> None:
        if decision.top_k:
            self.metrics.router_confidence.observe(decision.top_k[0].probability)
        if decision.routed_by == "fallback" and not mapping.router.shadow:
            self.metrics.fallbacks.labels(decision.adapter, "router_abstain").inc()
        if mapping.router.shadow and decision.routed_by != "router" and decision.router_choice is not None:
            agree = decision.router_choice == decision.adapter
            self.stats.shadow_decisions += 1
            self.stats.shadow_agreements += agree
            self.metrics.shadow.labels("true" if agree else "false").inc()

    def _record_success(self, r: ClassifyResponse) -> None:
        st = self.stats
        st.requests += 1
        st.by_adapter[r.adapter] += 1
        st.by_routed_by[r.routed_by] += 1
        st.by_mode[r.mode] += 1
        st.degraded += r.degraded
        if r.confidence is not None:
            st.confidence_sum += r.confidence
            st.confidence_n += 1
        self.metrics.routes.labels(r.adapter, r.routed_by).inc()
        logger.info(
            "served",
            extra={
                "request_id": r.request_id,
                "adapter": r.adapter,
                "worker_id": r.worker_id,
                "mode": r.mode,
                "routed_by": r.routed_by,
                "degraded": r.degraded,
                "latency_ms": r.timings_ms["total"],
            },
        )

    async def classify_batch(self, req: ClassifyBatchRequest, request_id: str) -> ClassifyBatchResponse:
        """Every item concurrently; a failed item carries its error and does not fail the others."""
        items = await asyncio.gather(
            *(self._batch_item(item, f"{request_id}-{i}") for i, item in enumerate(req.items))
        )
        return ClassifyBatchResponse(results=list(items))

    async def _batch_item(self, item: ClassifyRequest, request_id: str) -> ClassifyBatchItem:
        try:
            served = await self.classify(item, request_id)
        except MoleError as exc:
            error = BatchItemError(code=exc.code, message=exc.message, status=exc.status)
        except WorkerRejected as exc:
            error = BatchItemError(code=exc.code, message=exc.message, status=exc.status)
        except Exception:
            logger.exception("batch item failed", extra={"request_id": request_id})
            error = BatchItemError(code="internal_error", message="internal error", status=500)
        else:
            return ClassifyBatchItem(ok=True, result=served.response)
        return ClassifyBatchItem(ok=False, error=error)

    async def chat(
        self, req: ChatCompletionRequest, request_id: str
    ) -> tuple[ChatCompletionResponse, Served]:
        """An OpenAI chat completion served through :meth:`classify`."""
        classify, sampling = to_classify(req)
        served = await self.classify(classify, request_id, sampling=sampling)
        router = self._active.router
        body = completion(
            request_id=request_id,
            adapter=served.response.adapter,
            output=served.response.output,
            prompt_tokens=await asyncio.to_thread(router.count_tokens, classify.prompt),
            completion_tokens=served.tokens_generated,
            max_new_tokens=classify.max_new_tokens,
            fingerprint=served.router_version[:16] or None,
        )
        return body, served

    # ---- reload --------------------------------------------------------------------------------
    async def reload(self, reason: str) -> dict[str, Any]:
        """Re-read the mapping file; adopt it only when valid (paths checked, router labels single
        tokens, a changed router loadable). Otherwise ``MappingRejected`` and the old one stays."""
        async with self._reload_lock:
            old = self._active
            router = old.router
            try:
                mapping = await asyncio.to_thread(load_mapping, self.mapping_path, check_paths=True)
                if not router.serves(mapping):
                    router = Router(
                        mapping.base_model,
                        mapping.router.adapter,
                        self.settings,
                        self.metrics,
                        model_provider=self._router_model,
                    )
                    await asyncio.to_thread(router.load)
                config = router.config_for(mapping.router)
            except ConfigError as exc:
                await self._discard(router, old.router)
                self._rejected(reason, exc.message)
                problems = exc.details.get("problems", [exc.message])
                raise MappingRejected(
                    f"mapping reload rejected; the previous mapping stays in force: {exc.message}",
                    problems=problems,
                    path=str(self.mapping_path),
                ) from None
            except Exception as exc:  # the router model or its labels could not be loaded
                await self._discard(router, old.router)
                detail = f"{type(exc).__name__}: {exc}"
                self._rejected(reason, detail)
                raise MappingRejected(
                    f"mapping reload rejected; the previous mapping stays in force: router: {detail}",
                    problems=[f"router: {detail}"],
                    path=str(self.mapping_path),
                ) from None
            self._active = Active(mapping, router, config)
            self.dispatcher.update(mapping)
            if router is not old.router:
                await asyncio.to_thread(old.router.stop, self.settings.drain_timeout_s)
            self.metrics.reloads.labels("ok").inc()
            logger.info("mapping reloaded", extra={"reason": reason, "workers": len(mapping.workers)})
            return {
                "status": "reloaded",
                "path": str(self.mapping_path),
                "adapters": sorted(mapping.adapters),
                "workers": [w.id for w in mapping.workers],
                "router_version": router.version,
            }

    async def _discard(self, router: Router, keep: Router) -> None:
        """Stop a router built for a rejected mapping (it may hold a shared model's adapter)."""
        if router is not keep:
            await asyncio.to_thread(router.stop, 0.0)

    def _rejected(self, reason: str, detail: str) -> None:
        self.metrics.reloads.labels("rejected").inc()
        logger.error(
            "mapping reload rejected; keeping the previous mapping: %s", detail, extra={"reason": reason}
        )

    def reload_in_background(self, reason: str) -> None:
        """Schedule :meth:`reload` (for SIGHUP); the outcome is logged."""

        async def run() -> None:
            try:
                await self.reload(reason)
            except MappingRejected:
                pass  # already logged

        task = asyncio.get_running_loop().create_task(run(), name=f"reload-{reason}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
