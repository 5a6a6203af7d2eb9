"""``create_app``: the coordinator FastAPI app; everything heavy is built in the lifespan.

The lifespan loads the mapping (paths checked) and the router model, opens the one shared
``httpx.AsyncClient`` to the workers, starts the health prober, and installs a SIGHUP handler that
reloads the mapping (when the app runs on the main thread's loop, as under ``mole coordinator``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from fastapi import FastAPI

from coordinator.backends import Backend
from coordinator.deps import ApiKeyDep
from coordinator.router import RouterModelProvider
from coordinator.routes import admin, internal, ops, public
from coordinator.service import CoordinatorService
from shared.errors import install_error_handlers
from shared.http import (
    BodyLimitMiddleware,
    CancelOnDisconnectMiddleware,
    HeaderLimitMiddleware,
    RequestIdMiddleware,
    RequireJsonMiddleware,
    Scope,
    install_docs,
)
from shared.settings import Settings

logger = logging.getLogger(__name__)


def _install_sighup(service: CoordinatorService) -> bool:
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, service.active.reload_in_background, "SIGHUP")
    except (NotImplementedError, RuntimeError, ValueError, AttributeError):
        return False  # not the main thread (e.g. an in-process test server) or no SIGHUP here
    return True


def create_app(
    settings: Settings,
    mapping_path: Path,
    *,
    backends: Mapping[str, Backend] | None = None,
    router_model: RouterModelProvider | None = None,
) -> FastAPI:
    """The coordinator app for the mapping at ``mapping_path``.

    ``backends`` serves the named worker ids in-process instead of over HTTP and ``router_model``
    lends the router a model shared with them instead of loading one (monolithic mode,
    :mod:`mole.monolithic`).
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = await CoordinatorService.start(
            settings, Path(mapping_path), backends=backends, router_model=router_model
        )
        app.state.service = service
        sighup = _install_sighup(service)
        try:
            yield
        finally:
            if sighup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            await service.aclose()
            logger.info("coordinator stopped")

    app = FastAPI(
        title="mole coordinator",
        version="0.1.0",
        lifespan=lifespan,
        openapi_url=None,  # served by install_docs, behind the API key
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.api_keys = settings.api_key_set()
    app.state.metrics_tokens = settings.metrics_tokens(app.state.api_keys)
    install_error_handlers(app)
    app.add_middleware(RequireJsonMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(
        HeaderLimitMiddleware, max_bytes=settings.max_header_bytes, max_headers=settings.max_headers
    )
    app.add_middleware(CancelOnDisconnectMiddleware, on_cancel=_count_cancelled)
    app.add_middleware(RequestIdMiddleware)  # outermost: even a 413 carries the request id
    app.include_router(public)
    app.include_router(admin)
    app.include_router(internal)
    app.include_router(ops)
    install_docs(app, ApiKeyDep)
    return app


def _count_cancelled(scope: Scope) -> None:
    """A request cancelled because its client disconnected (``mole_coordinator_cancelled_requests_total``)."""
    service: CoordinatorService | None = getattr(scope["app"].state, "service", None)
    if service is not None:
        service.metrics.cancelled.inc()
    logger.info(
        "client disconnected; request cancelled",
        extra={"request_id": scope.get("state", {}).get("request_id")},
    )
