"""FastAPI dependencies of the worker routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from shared.http import check_bearer
from worker.service import WorkerService


def get_service(request: Request) -> WorkerService:
    return request.app.state.service  # type: ignore[no-any-return]


def require_worker_token(request: Request) -> None:
    """When ``MOLE_WORKER_TOKEN`` is set, require ``Authorization: Bearer <token>``."""
    token = request.app.state.settings.worker_token_value()
    check_bearer(request, frozenset([token]) if token else frozenset(), "worker token")


Service = Annotated[WorkerService, Depends(get_service)]
WorkerAuth = Depends(require_worker_token)
