"""The real-time layer as one object: Socket.IO rooms, SSE streams, publishing.

::

    realtime = Realtime(
        authenticate=tenant_of_token,      # async (token) -> tenant id | None
        authorize=may_join,                # async (tenant, "product:42") -> bool
        snapshot=current_state,            # async (tenant, "product:42") -> dict
        metrics=dashboard_figures,         # async (tenant) -> dict
        redis_url="redis://...",           # several instances; None: this process only
    )
    realtime.mount(app)                    # /socket.io/, the SSE route, the browser script
    # in the app's lifespan:
    async with realtime:
        ...
    await realtime.publish_stock_update(tenant, product_id, new_stock)

Without ``redis_url`` (nor ``history``) rooms and streams live in this process
(:class:`~freshcache.realtime.history.MemoryHistory`); with it, any instance's publish
reaches every instance's clients, and histories survive instance restarts.

Serving many clients: every room message is encoded once, but a WebSocket connection
that negotiated ``permessage-deflate`` (browsers always offer it) makes the server
compress it once per connection; run uvicorn with ``ws_per_message_deflate=False``
(``--ws-per-message-deflate false``) on instances that broadcast to thousands. In a
process dedicated to real-time clients, ``freeze_collector=True`` keeps full garbage
collections (100 ms and more with thousands of connections) out of the delivery path.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from freshcache.realtime.collector import CollectorFreezer
from freshcache.realtime.fanout import Fanout, RealtimeStats
from freshcache.realtime.history import MemoryHistory, RedisHistory, RoomHistory
from freshcache.realtime.rooms import (
    Authenticate,
    Authorize,
    SnapshotLoader,
    SocketRooms,
    check_event,
    tenant_channel,
)
from freshcache.realtime.sse import TENANT_STREAM, MetricsLoader, TenantStreams

__all__ = ["LIVE_SCRIPT", "Realtime"]

LIVE_SCRIPT = Path(__file__).parent / "static" / "freshcache-live.js"
"""The browser module (``freshcache-live.js``) shipped with the package."""


class Realtime:
    """Socket.IO rooms and SSE streams for live stock, order and dashboard updates.

    Options:

    - ``authenticate``, ``authorize``, ``snapshot``, ``metrics``: the application's
      async callables (see :mod:`freshcache.realtime.rooms` and ``sse``).
    - ``history`` (or ``redis_url``): where room histories live and how messages reach
      every instance. Default: this process only.
    - ``room_kinds``: the room names clients may subscribe to, ``<kind>:<id>``.
    - ``send_queue_limit``: frames a connection may have waiting; one more and it is
      disconnected as a slow consumer.
    - ``metrics_interval``: seconds between dashboard figures (the seed's 30).
    - ``heartbeat_interval``: seconds between SSE comment lines.
    - ``freeze_collector``: keep the cyclic garbage collector out of the delivery path
      (:mod:`freshcache.realtime.collector`; process-wide, so off by default).
    - other keyword options go to python-socketio's ``AsyncServer``
      (``cors_allowed_origins`` - by default same origin only - ``ping_interval``, ...).
    """

    def __init__(
        self,
        *,
        authenticate: Authenticate,
        authorize: Authorize,
        snapshot: SnapshotLoader,
        metrics: MetricsLoader | None = None,
        history: RoomHistory | None = None,
        redis_url: str | None = None,
        room_kinds: Sequence[str] = ("product", "order"),
        send_queue_limit: int = 256,
        metrics_interval: float = 30.0,
        heartbeat_interval: float = 15.0,
        freeze_collector: bool = False,
        **socketio_options: Any,
    ) -> None:
        if history is None:
            history = RedisHistory(redis_url) if redis_url else MemoryHistory()
        self.history = history
        self.stats = RealtimeStats()
        self.collector = CollectorFreezer() if freeze_collector else None
        self.fanout = Fanout(history, self.stats)
        self.rooms = SocketRooms(
            self.fanout,
            history,
            self.stats,
            authenticate=authenticate,
            authorize=authorize,
            snapshot=snapshot,
            room_kinds=room_kinds,
            send_queue_limit=send_queue_limit,
            collector=self.collector,
            **socketio_options,
        )
        self.streams = TenantStreams(
            self.fanout,
            history,
            self.stats,
            authenticate=authenticate,
            metrics=metrics,
            interval=metrics_interval,
            heartbeat=heartbeat_interval,
            send_queue_limit=send_queue_limit,
            collector=self.collector,
        )

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe to the fan-out (waits up to 5 s for it; keeps trying after that)."""
        await self.fanout.start()
        if self.collector is not None:
            self.collector.start()

    async def stop(self) -> None:
        """Close the streams and connections, unsubscribe, release connections."""
        await self.streams.stop()
        await self.rooms.close_all()
        await self.fanout.stop()
        await self.history.close()
        if self.collector is not None:
            self.collector.stop()

    async def __aenter__(self) -> Realtime:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- publishing ---------------------------------------------------------------------

    async def publish(self, tenant: str, room: str, event: str, payload: dict[str, Any]) -> str:
        """Send ``event(payload)`` to the tenant's ``room`` (e.g. ``product:42``) on every
        instance; return the message's offset. Raises ValueError for a room or event
        name that is not allowed, StoreUnavailable if the history cannot be reached."""
        if not self.rooms.is_room(room):
            raise ValueError(f"not a room clients can subscribe to: {room!r}")
        return await self._append(tenant_channel(tenant, room), event, payload)

    async def publish_stock_update(
        self, tenant: str, product_id: str | int, new_stock: int, *, timestamp: float | None = None
    ) -> str:
        """The seed's ``stockUpdate`` ``{productId, newStock, timestamp}`` (milliseconds)
        to ``product:<id>``."""
        payload = {
            "productId": product_id,
            "newStock": new_stock,
            "timestamp": _milliseconds() if timestamp is None else timestamp,
        }
        return await self.publish(tenant, f"product:{product_id}", "stockUpdate", payload)

    async def publish_status_update(
        self,
        tenant: str,
        order_id: str | int,
        status: str,
        *,
        tracking_number: str | None = None,
        estimated_delivery: str | None = None,
    ) -> str:
        """The seed's ``statusUpdate`` ``{orderId, status, trackingNumber,
        estimatedDelivery}`` to ``order:<id>``."""
        payload = {
            "orderId": order_id,
            "status": status,
            "trackingNumber": tracking_number,
            "estimatedDelivery": estimated_delivery,
        }
        return await self.publish(tenant, f"order:{order_id}", "statusUpdate", payload)

    async def publish_tenant_event(self, tenant: str, event: str, data: dict[str, Any]) -> str:
        """Send a critical event (``newOrder``, ``lowStock``...) to the tenant's SSE
        streams at once; return its offset (the SSE ``id``)."""
        return await self._append(tenant_channel(tenant, TENANT_STREAM), event, data)

    async def _append(self, channel: str, event: str, payload: dict[str, Any]) -> str:
        message = await self.history.append(
            channel, check_event(event), orjson.dumps(payload).decode()
        )
        self.stats.published += 1
        return message.offset

    # -- serving ------------------------------------------------------------------------

    def asgi_app(self, other_app: Any = None, *, socketio_path: str = "/socket.io") -> Any:
        """An ASGI app serving Socket.IO at ``socketio_path`` and passing everything else
        to ``other_app`` (404 without one). Its lifespan is ``other_app``'s."""
        return self.rooms.asgi_app(other_app, path=socketio_path.strip("/"))

    async def sse_endpoint(self, request: Request) -> Response:
        """The Starlette endpoint of a tenant's live stream (route it at ``GET``)."""
        return await self.streams.endpoint(request)

    def routes(
        self,
        *,
        socketio_path: str = "/socket.io",
        sse_path: str = "/api/dashboard/live-stream",
        script_path: str = "/static/freshcache-live.js",
    ) -> list[BaseRoute]:
        """Starlette routes: Socket.IO, the SSE stream and the browser script."""
        return [
            Mount(socketio_path, app=self.rooms.asgi_app(path=socketio_path.strip("/"))),
            Route(sse_path, self.sse_endpoint, methods=["GET"]),
            Route(script_path, live_script, methods=["GET", "HEAD"]),
        ]

    def mount(self, app: Starlette, **paths: str) -> None:
        """Add :meth:`routes` (same keyword paths) to ``app`` (Starlette or FastAPI),
        ahead of its own routes so that no catch-all or ``/static`` mount hides them.
        Start and stop this object in the app's lifespan."""
        app.router.routes[0:0] = self.routes(**paths)


async def live_script(request: Request) -> Response:
    """The browser module ``freshcache-live.js``."""
    return FileResponse(
        LIVE_SCRIPT,
        media_type="text/javascript",
        headers={"Cache-Control": "public, max-age=300"},
    )


def _milliseconds() -> int:
    return int(time.time() * 1000)
