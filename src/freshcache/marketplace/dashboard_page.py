"""The live dashboard page at ``/dashboard``: plain HTML, CSS and JavaScript shipped with
the package (no build step, nothing fetched from elsewhere).

The page asks for a token and keeps it in ``sessionStorage`` (gone with the tab). With a
tenant's API key it shows that tenant's dashboard: the pre-computed figures (orders,
revenue by hour, top products, low stock) from ``GET /api/dashboard``, and over them the
live events of ``GET /api/dashboard/live-stream`` (new orders, stock alerts). With the
admin token it shows the operator's view: hit ratio per endpoint over time,
invalidations per minute, latency cached vs uncached, real-time connections and the
firing alerts, from ``GET /api/monitoring/overview`` and its live stream.

Browsers' ``EventSource`` cannot send headers, so the page passes the token to the
streams as ``?access_token=``, which both streams accept (mind that such URLs can end up
in access logs); every other request sends it in ``Authorization``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.responses import FileResponse, Response

__all__ = ["STATIC", "router"]

STATIC = Path(__file__).parent / "static"
"""The page's files."""

router = APIRouter(tags=["dashboard page"], include_in_schema=False)

# Revalidated at every load: a deploy's new page is picked up at once.
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


def _file(name: str, media_type: str) -> Response:
    return FileResponse(STATIC / name, media_type=media_type, headers=_HEADERS)


@router.get("/dashboard")
async def dashboard_page() -> Response:
    return _file("dashboard.html", "text/html; charset=utf-8")


@router.get("/dashboard/dashboard.js")
async def dashboard_script() -> Response:
    return _file("dashboard.js", "text/javascript; charset=utf-8")


@router.get("/dashboard/dashboard.css")
async def dashboard_styles() -> Response:
    return _file("dashboard.css", "text/css; charset=utf-8")
