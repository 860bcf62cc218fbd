"""The operator's routes: firing alerts, the overview's chart points, and their live
stream (admin token; see :mod:`freshcache.marketplace.monitoring`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from freshcache.marketplace.auth import AdminAccess
from freshcache.marketplace.errors import ApiError
from freshcache.marketplace.monitoring import Monitor, alert_record

__all__ = ["router"]

router = APIRouter(tags=["monitoring"])


def _monitor(request: Request) -> Monitor:
    monitor: Monitor = request.app.state.monitor
    return monitor


@router.get("/api/alerts")
async def firing_alerts(request: Request, _: AdminAccess) -> dict[str, Any]:
    """The alerts firing at this instance's last evaluation of the rules."""
    monitor = _monitor(request)
    return {
        "evaluated_at": monitor.evaluated_at,
        "interval": monitor.interval,
        "firing": [alert_record(alert) for alert in monitor.firing],
        "rules": [
            {"name": rule.name, "severity": rule.severity, "action": rule.action}
            for rule in monitor.evaluator.rules
        ],
    }


@router.get("/api/monitoring/overview")
async def overview(request: Request, _: AdminAccess) -> dict[str, Any]:
    """Hit ratio per endpoint, invalidations per minute, latency and connections per
    interval (the last hour), the reads per endpoint so far, and the firing alerts."""
    return _monitor(request).overview()


@router.get("/api/monitoring/live-stream")
async def operator_stream(request: Request) -> Response:
    """SSE: the overview at once and every interval, ``alerts`` when they change. The
    admin token goes in ``Authorization: Bearer`` or ``?access_token=``."""
    streams = _monitor(request).streams
    if streams is None:
        raise ApiError(404, "not_found", "this instance runs no real-time layer")
    return await streams.endpoint(request)
