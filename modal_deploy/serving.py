"""What a Modal container serves, without importing ``modal``: the worker or coordinator app built
from the mapping shipped in the image, loaded once when the container starts.

A worker's FastAPI lifespan loads its model in the background and answers 503 until ready; on Modal
the container should take traffic only once the model is loaded, so :func:`load` runs the worker's
lifespan itself (from ``@modal.enter``) and waits for readiness, and the ASGI app handed to Modal
acknowledges Modal's own lifespan messages without running it a second time. The coordinator's
lifespan starts tasks on the serving loop (health prober, HTTP client), so Modal runs that one.

A worker on vLLM (``modal_deploy/vllm_app.py``) is vLLM's own server instead, started by
:func:`vllm_command` behind ``@modal.web_server``: Modal routes traffic to the container once the
port accepts connections, which vLLM's server does when its engine has loaded (it binds the port
early and listens when its HTTP server starts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from modal_deploy.spec import MAPPING_IN_IMAGE, VLLM_PORT, AppSpec

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
POLL_S = 0.5  # readiness poll while @modal.enter waits for the worker's model


class Reloadable(Protocol):
    """What :func:`volume_refresher` needs of a ``modal.Volume``."""

    def reload(self) -> None: ...


def volume_refresher(volumes: Sequence[Reloadable]) -> Callable[[], None]:
    """A ``refresh_storage`` for the worker: ``Volume.reload()`` on each volume, so a container
    started before an adapter was put on the volume sees it. Modal refuses a reload while files of
    the volume are open; that is logged, not raised (the caller then reads what the container sees)."""

    def refresh() -> None:
        for volume in volumes:
            try:
                volume.reload()
            except Exception as exc:  # Modal's own error types; the load that follows says what is missing
                logger.warning("volume reload failed: %s: %s", type(exc).__name__, exc)

    return refresh


class ASGIApp(Protocol):
    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None: ...


class ContainerApp:
    """An ASGI app ready to hand to ``@modal.asgi_app`` and the ``close()`` to call on exit."""

    def __init__(self, asgi: ASGIApp, lifespan: contextlib.AbstractAsyncContextManager[Any] | None = None):
        self._inner = asgi
        self._lifespan = lifespan
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Run the app's lifespan startup now, on a private loop kept until :meth:`close`."""
        if self._lifespan is not None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._lifespan.__aenter__())

    def close(self) -> None:
        """Run the lifespan shutdown (the worker drains its batcher). Idempotent."""
        if self._lifespan is not None and self._loop is not None:
            self._loop.run_until_complete(self._lifespan.__aexit__(None, None, None))
            self._loop.close()
            self._loop = None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan" and self._lifespan is not None:
            while True:  # already started in start(); acknowledge the server's startup/shutdown
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await self._inner(scope, receive, send)


def load(
    spec: AppSpec,
    mapping_path: str | Path = MAPPING_IN_IMAGE,
    *,
    timeout_s: float | None = None,
    refresh_storage: Callable[[], None] | None = None,
) -> ContainerApp:
    """Build ``spec``'s service from the mapping; for a worker, load its model and return once it
    is ready (``RuntimeError`` when loading fails, the token is missing, or ``timeout_s`` passes).
    ``refresh_storage`` (a worker's; see :func:`volume_refresher`) runs before an adapter is loaded
    from a path (``POST /adapters``)."""
    from shared.logging import configure_logging
    from shared.mapping import load_mapping
    from shared.settings import Settings

    settings = Settings()
    configure_logging(settings)  # as mole/cli.py does: MOLE_LOG_JSON and MOLE_LOG_LEVEL apply here too
    if settings.worker_token_value() is None:
        raise RuntimeError("MOLE_WORKER_TOKEN is not set: add it to the Modal secret (docs/deploy.md)")
    if spec.role == "coordinator":
        from coordinator.app import create_app as create_coordinator

        return ContainerApp(create_coordinator(settings, Path(mapping_path)))

    from worker.app import create_app as create_worker

    assert spec.worker_id is not None
    app = create_worker(settings, load_mapping(mapping_path), spec.worker_id, refresh_storage=refresh_storage)
    container_app = ContainerApp(app, app.router.lifespan_context(app))
    container_app.start()
    budget = timeout_s if timeout_s is not None else spec.startup_timeout_s
    deadline = time.monotonic() + budget
    service = app.state.service
    while service.state not in ("ready", "failed"):
        if time.monotonic() > deadline:
            container_app.close()
            raise RuntimeError(f"worker {spec.worker_id} not ready after {budget:.0f}s")
        time.sleep(POLL_S)
    if service.state == "failed":
        container_app.close()
        raise RuntimeError(f"worker {spec.worker_id} failed to load: {service.load_error}")
    return container_app


def vllm_command(
    spec: AppSpec, mapping_path: str | Path = MAPPING_IN_IMAGE, python: str = sys.executable
) -> list[str]:
    """What a vLLM worker's container runs: ``mole.vllm_serve`` for the spec's worker, which reads
    the mapping and the adapters on the container's volumes, takes the worker token from the Modal
    secret as the server's API key and replaces itself with vLLM's server on :data:`VLLM_PORT`."""
    if spec.engine != "vllm" or spec.worker_id is None:
        raise ValueError(f"{spec.name} is not a vLLM worker's app")
    config = str(mapping_path)
    return [
        python,
        "-m",
        "mole.vllm_serve",
        "--config",
        config,
        "--worker-id",
        spec.worker_id,
        "--port",
        str(VLLM_PORT),
    ]
