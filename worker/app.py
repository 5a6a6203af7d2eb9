"""``create_app``: the worker's FastAPI application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from shared.errors import install_error_handlers
from shared.http import (
    BodyLimitMiddleware,
    CancelOnDisconnectMiddleware,
    HeaderLimitMiddleware,
    RequestIdMiddleware,
    RequireJsonMiddleware,
    install_docs,
)
from shared.mapping import MoleMapping
from shared.settings import Settings, resolve_device_dtype
from worker.deps import WorkerAuth
from worker.routes import router
from worker.service import WorkerService

logger = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    mapping: MoleMapping,
    worker_id: str,
    *,
    refresh_storage: Callable[[], None] | None = None,
) -> FastAPI:
    """A worker app serving ``worker_id`` of ``mapping``. The model loads in the background after
    start-up; ``/health/ready`` is 503 until it is loaded and warmed. ``refresh_storage`` makes
    files added to the weight storage since start visible (Modal: ``Volume.reload()``)."""
    spec = mapping.worker(worker_id)  # fail fast on an unknown id

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        device, dtype = resolve_device_dtype(settings)
        service = WorkerService(
            settings, mapping, worker_id, device=device, dtype=dtype, refresh_storage=refresh_storage
        )
        app.state.service = service
        service.start_loading()
        try:
            yield
        finally:
            service.drain()
            logger.info("worker %s stopped", worker_id)

    app = FastAPI(
        title=f"mole worker {spec.id}",
        version="0.1.0",
        lifespan=lifespan,
        openapi_url=None,  # served by install_docs, behind the worker token
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(router)
    install_docs(app, WorkerAuth)
    app.add_middleware(RequireJsonMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(
        HeaderLimitMiddleware, max_bytes=settings.max_header_bytes, max_headers=settings.max_headers
    )
    # a worker's service counts its own cancellations (mole_worker_cancelled_requests)
    app.add_middleware(CancelOnDisconnectMiddleware)
    app.add_middleware(RequestIdMiddleware)
    return app
