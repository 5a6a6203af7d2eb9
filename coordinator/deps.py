"""FastAPI dependencies of the coordinator's routes, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from coordinator.service import CoordinatorService
from shared.errors import NotReady
from shared.http import check_bearer, request_id


def get_service(request: Request) -> CoordinatorService:
    """The app's serving object (built in the lifespan)."""
    service: CoordinatorService | None = getattr(request.app.state, "service", None)
    if service is None:
        raise NotReady("the coordinator is starting")
    return service


def get_request_id(request: Request) -> str:
    """The request id accepted or minted by ``RequestIdMiddleware``."""
    return request_id(request)


def require_api_key(request: Request) -> None:
    """``Authorization: Bearer <key>`` with one of ``MOLE_API_KEYS`` (no-op when none are set)."""
    check_bearer(request, request.app.state.api_keys, "API key")


def require_metrics_token(request: Request) -> None:
    """``GET /metrics``: the metrics token (``MOLE_METRICS_TOKEN``) or an API key, when either is set."""
    check_bearer(request, request.app.state.metrics_tokens, "metrics token")


ServiceDep = Annotated[CoordinatorService, Depends(get_service)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
ApiKeyDep = Depends(require_api_key)
MetricsDep = Depends(require_metrics_token)
