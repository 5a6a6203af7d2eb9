"""The mapping in force, and its swap on reload (``POST /admin/reload``, SIGHUP).

The mapping, the router model and its label configuration are swapped together as one
:class:`Active` snapshot, so a request started before a reload finishes on the mapping it began
with. A reload adopts a new mapping only when it is valid (paths checked, router labels tokenizable and
distinct, a changed router loadable); otherwise ``MappingRejected`` and the old one stays.
The router is built in one place (:meth:`ActiveMapping._router_for`), for start and for reload.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from coordinator.metrics import CoordinatorMetrics
from coordinator.router import Router, RouterConfig, RouterModelProvider
from coordinator.vllm_router import VllmRouter
from shared.errors import ConfigError, MoleError
from shared.mapping import AdapterSpec, MoleMapping, load_mapping
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
    router: Router | VllmRouter  # VllmRouter: the mapping's router.served_by runs it
    config: RouterConfig


class ActiveMapping:
    """Holds the :class:`Active` snapshot; loads it at start and swaps it on a valid reload.

    ``on_swap`` is called with each newly adopted mapping (the dispatcher adopts its workers).
    """

    def __init__(
        self,
        settings: Settings,
        path: Path,
        metrics: CoordinatorMetrics,
        *,
        router_model: RouterModelProvider | None = None,
        client: httpx.AsyncClient | None = None,
    ):
        self.settings = settings
        self.path = path
        self._metrics = metrics
        self._client = client  # a router on a vLLM worker calls it with this (the workers' client)
        self._router_model = router_model  # lends routers a shared model (monolithic mode)
        self._current: Active | None = None
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()
        self.on_swap: Callable[[MoleMapping], None] = lambda _mapping: None

    @property
    def current(self) -> Active:
        assert self._current is not None, "ActiveMapping.load() has not run"
        return self._current

    def adapter_spec(self, name: str) -> AdapterSpec | None:
        """Adapter ``name``'s entry in the mapping in force (None: not in the mapping)."""
        return self.current.mapping.adapters.get(name)

    def _router_for(self, mapping: MoleMapping, reuse: Router | VllmRouter | None) -> Router | VllmRouter:
        """``reuse`` when it serves ``mapping`` (same base and adapter), else a new, loaded router:
        on the vLLM worker of ``router.served_by``, else in this process.

        Blocking: run off the event loop."""
        remote = mapping.router.served_by is not None
        if reuse is not None and isinstance(reuse, VllmRouter) == remote and reuse.serves(mapping):
            return reuse
        router: Router | VllmRouter
        if remote:
            if self._client is None:
                raise ConfigError("router.served_by: this coordinator has no client for workers")
            router = VllmRouter(mapping, self.settings, self._client, self.settings.worker_token_value())
            router.load()
            return router
        router = Router(
            mapping.base_model,
            mapping.router.adapter,
            self.settings,
            self._metrics,
            model_provider=self._router_model,
        )
        router.load()
        return router

    async def load(self) -> Active:
        """The first snapshot: load the mapping (paths checked) and its router. Raises on failure."""
        mapping = await asyncio.to_thread(load_mapping, self.path, check_paths=True)
        router = await asyncio.to_thread(self._router_for, mapping, None)
        self._current = Active(mapping, router, router.config_for(mapping.router))
        return self._current

    async def reload(self, reason: str) -> dict[str, Any]:
        """Re-read the mapping file and adopt it when valid; else ``MappingRejected``."""
        async with self._lock:
            old = self.current
            router = old.router
            try:
                mapping = await asyncio.to_thread(load_mapping, self.path, check_paths=True)
                router = await asyncio.to_thread(self._router_for, mapping, old.router)
                config = router.config_for(mapping.router)
            except Exception as exc:
                if router is not old.router:  # built for the rejected mapping (may hold a shared adapter)
                    await asyncio.to_thread(router.stop, 0.0)
                raise self._rejected(reason, exc) from None
            self._current = Active(mapping, router, config)
            self.on_swap(mapping)
            if router is not old.router:
                await asyncio.to_thread(old.router.stop, self.settings.drain_timeout_s)
            self._metrics.reloads.labels("ok").inc()
            logger.info("mapping reloaded", extra={"reason": reason, "workers": len(mapping.workers)})
            return {
                "status": "reloaded",
                "path": str(self.path),
                "adapters": sorted(mapping.adapters),
                "workers": [w.id for w in mapping.workers],
                "router_version": router.version,
            }

    def _rejected(self, reason: str, exc: Exception) -> MappingRejected:
        if isinstance(exc, ConfigError):
            detail = exc.message
            problems = exc.details.get("problems", [exc.message])
        else:  # the router model or its labels could not be loaded
            detail = f"router: {type(exc).__name__}: {exc}"
            problems = [detail]
        self._metrics.reloads.labels("rejected").inc()
        logger.error(
            "mapping reload rejected; keeping the previous mapping: %s", detail, extra={"reason": reason}
        )
        return MappingRejected(
            f"mapping reload rejected; the previous mapping stays in force: {detail}",
            problems=problems,
            path=str(self.path),
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

    async def aclose(self) -> None:
        """Cancel background reloads and stop the router in force."""
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._current is not None:
            await asyncio.to_thread(self._current.router.stop, self.settings.drain_timeout_s)
