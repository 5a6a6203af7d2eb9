"""Monolithic mode: the coordinator and its dynamic worker in one process, on one base model.

For a single-GPU box; selected by ``"monolithic": true`` in the mapping (``mole coordinator`` and
``mole up`` then build the app with :func:`create_monolithic_app`). The HTTP API is the
coordinator's, unchanged.

- ONE PEFT model: the base of the mapping's first dynamic worker (:func:`inprocess_worker`) with
  every adapter that worker holds, plus the router LoRA under :data:`ROUTER_ADAPTER`, a hidden
  adapter that the worker never serves (the name cannot be an adapter name of a mapping).
- The coordinator's router borrows that model object (:meth:`Monolith.lend_router`): one copy of
  the weights in memory. Its forwards pass ``adapter_names=[ROUTER_ADAPTER] * n``.
- The worker side is the ordinary :class:`~worker.service.WorkerService` (limits, micro-batcher,
  mixed-adapter generate), reached through :class:`InProcessBackend` instead of HTTP.
- PEFT installs forward hooks per call for per-row ``adapter_names``, so two forwards on the model
  must never overlap: router forwards and expert generates serialise on the holder's lock.
- Every other worker of the mapping (e.g. merged replicas) is still dispatched over HTTP as usual.

This module is one of the three places allowed to compose both services (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI

from coordinator.app import create_app
from coordinator.backends import (
    AttemptFailed,
    AttemptTimedOut,
    CallContext,
    EventStream,
    Failure,
    Probe,
    probe_of,
    read_error,
)
from coordinator.router import SharedModel
from shared.errors import ConfigError, MoleError
from shared.mapping import MoleMapping, WorkerSpec, load_mapping
from shared.schemas import InferRequest, InferResponse
from shared.settings import Settings, resolve_device_dtype
from worker.holders import DynamicHolder
from worker.service import WorkerService

logger = logging.getLogger(__name__)

ROUTER_ADAPTER = "__router__"  # the router LoRA's name in the shared model (never a mapping adapter)


def inprocess_worker(mapping: MoleMapping) -> WorkerSpec:
    """The worker a monolithic coordinator serves in its own process: the first dynamic worker.

    ``ConfigError`` when there is none, or when its model is not the mapping's base model (the
    router LoRA must run on the base it was trained on, and one process holds one base).
    """
    spec = next((w for w in mapping.workers if w.mode == "dynamic"), None)
    if spec is None:
        raise ConfigError("monolithic: needs a dynamic worker to run in the coordinator's process")
    if os.path.normpath(mapping.model_path(spec.id)) != os.path.normpath(mapping.base_model):
        raise ConfigError(
            f'monolithic: workers "{spec.id}".model ({spec.model}) must be the base_model '
            f"({mapping.base_model}): the router and the experts share one base model"
        )
    return spec


class InProcessBackend:
    """A :class:`~coordinator.backends.Backend` around a :class:`WorkerService` of this process.

    The worker's typed errors go through the same table as an HTTP worker's answers
    (:func:`~coordinator.backends.read_error`); anything else is a broken answer, like a 500.
    """

    def __init__(self, service: WorkerService):
        self.worker_id = service.spec.id
        self.service = service

    @contextlib.asynccontextmanager
    async def _outcomes(self, call: CallContext) -> AsyncIterator[None]:
        """The worker's exceptions as the outcomes an HTTP worker's answers would be."""
        try:
            async with asyncio.timeout(call.timeout_s):
                yield
        except TimeoutError:
            raise AttemptTimedOut(f"no answer within {call.timeout_s:.1f}s") from None
        except MoleError as exc:
            read_error(self.worker_id, exc)  # raises: a typed error is never an answer
        except Exception:  # what the worker's HTTP layer would answer as a 500
            logger.exception(
                "in-process worker failed", extra={"worker_id": self.worker_id, "request_id": call.request_id}
            )
            raise AttemptFailed(Failure.HTTP_500) from None

    async def infer(self, request: InferRequest, call: CallContext) -> InferResponse:
        async with self._outcomes(call):
            return await self.service.infer(request, deadline=time.monotonic() + call.timeout_s)
        raise AssertionError("unreachable")  # _outcomes re-raises every failure

    @contextlib.asynccontextmanager
    async def stream(self, request: InferRequest, call: CallContext) -> AsyncIterator[EventStream]:
        async with self._outcomes(call):  # until the first token, like an HTTP worker's status
            opened = await self.service.open_stream(request, deadline=time.monotonic() + call.timeout_s)
        events = opened.events()
        try:
            yield events
        finally:
            await events.aclose()

    async def health(self) -> Probe:
        return probe_of(self.service.ready_body())


class Monolith:
    """The process's one model: the in-process worker, which lends the router its model.

    Nothing loads in the constructor; the coordinator's lifespan loads everything through the first
    :meth:`lend_router` call (``Router.load``, off the event loop).
    """

    def __init__(self, settings: Settings, mapping: MoleMapping):
        self.spec = inprocess_worker(mapping)
        device, dtype = resolve_device_dtype(settings)
        self.worker = WorkerService(settings, mapping, self.spec.id, device=device, dtype=dtype)
        self.backend = InProcessBackend(self.worker)
        self._lent = 0  # router adapters lent so far (a reload that changes the router adds one)

    @property
    def holder(self) -> DynamicHolder:
        holder = self.worker.holder
        assert isinstance(holder, DynamicHolder), "the in-process worker is a dynamic worker"
        return holder

    def lend_router(self, base_model: str, adapter: str) -> SharedModel:
        """A :data:`~coordinator.router.RouterModelProvider`: load the worker on the first call
        (base + experts, warmed), then add ``adapter`` to its model as a hidden adapter and lend the
        model, its lock, and a release that unloads that adapter again."""
        if self.worker.state == "loading":
            self.worker.load()
        self.worker.require_ready()
        holder = self.holder
        if os.path.normpath(base_model) != os.path.normpath(holder.model_path):
            raise ValueError(
                f"monolithic: the router's base model {base_model} is not the in-process model "
                f"{holder.model_path}; one process serves one base model (restart to change it)"
            )
        self._lent += 1
        name = ROUTER_ADAPTER if self._lent == 1 else f"{ROUTER_ADAPTER}{self._lent}"
        holder.add_hidden_adapter(name, Path(adapter))
        logger.info(
            "monolithic: router adapter %s and %d expert adapters share one model",
            name,
            len(holder.adapters()),
            extra={"worker_id": self.spec.id, "model_id": f"{id(holder.model):#x}"},
        )
        return SharedModel(
            holder.model, name, holder.lock, release=lambda: holder.remove_hidden_adapter(name)
        )


def create_monolithic_app(settings: Settings, mapping_path: Path) -> FastAPI:
    """The coordinator app for ``mapping_path`` with its dynamic worker served in-process.

    Same API as :func:`coordinator.app.create_app`; the model loads in the lifespan. On shutdown the
    coordinator stops first (it drains requests that need the worker), then the worker drains.
    """
    mapping = load_mapping(Path(mapping_path))
    monolith = Monolith(settings, mapping)
    app = create_app(
        settings,
        Path(mapping_path),
        backends={monolith.spec.id: monolith.backend},
        router_model=monolith.lend_router,
    )
    coordinator_lifespan = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            async with coordinator_lifespan(app):
                # one process, one budget of decoded pixels (MOLE_MAX_PIXELS_IN_FLIGHT): the
                # router's and the in-process worker's images count against the same limit
                app.state.service.pixels = monolith.worker.pixels
                yield
        finally:
            await asyncio.to_thread(monolith.worker.drain)
            logger.info("in-process worker %s stopped", monolith.spec.id)

    app.router.lifespan_context = lifespan
    app.state.monolith = monolith
    return app
