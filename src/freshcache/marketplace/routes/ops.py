"""Application events (the seed's JSON form), health and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from freshcache.core.events import InvalidEvent, parse_event
from freshcache.marketplace.auth import TenantAccess, runtime_of
from freshcache.marketplace.errors import ApiError
from freshcache.marketplace.metrics import Metrics

__all__ = ["router"]

router = APIRouter(tags=["operations"])

_MAX_EVENT_BYTES = 64 * 1024


@router.post("/api/events", status_code=202)
async def post_event(request: Request, tenant: TenantAccess) -> dict[str, Any]:
    """Accept an application event for the caller's tenant: it goes on the bus (for every
    worker and real-time subscriber) and its invalidations are applied before answering."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_EVENT_BYTES:
            raise ApiError(413, "too_large", f"an event is at most {_MAX_EVENT_BYTES} bytes")
    runtime = runtime_of(request)
    try:
        event = parse_event(bytes(body))
        if event.tenant_id != tenant.id:
            raise ApiError(403, "forbidden", "tenantId: must be the tenant of the API key")
        plan = runtime.rules.plan(event)
    except InvalidEvent as error:
        raise ApiError(422, "invalid_event", str(error)) from None
    await runtime.publish(event)
    await runtime.changed(event)
    return {"eventId": event.event_id, "invalidated": list(plan.describe())}


@router.get("/healthz")
async def health(request: Request) -> dict[str, str]:
    runtime = runtime_of(request)
    try:
        async with runtime.database.read() as connection:
            await connection.execute(text("SELECT 1"))
    except (SQLAlchemyError, OSError) as error:
        raise ApiError(503, "unavailable", f"database: {type(error).__name__}") from None
    return {"status": "ok", "deployment": "embedded" if runtime.settings.embedded else "shared"}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    registry = _metrics(request).registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _metrics(request: Request) -> Metrics:
    found: Metrics = request.app.state.metrics
    return found
