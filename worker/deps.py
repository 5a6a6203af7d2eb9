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


def require_metrics_token(request: Request) -> None:
    """``GET /metrics``: the metrics token (``MOLE_METRICS_TOKEN``) or the worker token, when either is set."""
    settings = request.app.state.settings
    token = settings.worker_token_value()
    accepted = settings.metrics_tokens(frozenset([token]) if token else frozenset())
    check_bearer(request, accepted, "metrics token")


Service = Annotated[WorkerService, Depends(get_service)]
WorkerAuth = Depends(require_worker_token)
MetricsAuth = Depends(require_metrics_token)
