"""Server-Sent Events for dashboards: periodic metrics and critical events per tenant.

``GET`` the endpoint with ``Authorization: Bearer <token>`` (or, for browsers'
``EventSource``, which cannot set headers, ``?access_token=<token>``: mind that URLs end
up in logs). The stream sends, each with an ``id:``:

- ``metrics``: the application's figures for the tenant at once, then every
  ``interval`` seconds (computed once per tenant and instance, shared by its streams);
- the tenant's critical events (``publish_tenant_event``: a new order, stock below its
  threshold) as soon as they are published, from any instance.

Every ``id`` is the offset of the last critical event the stream has carried, so a client
that reconnects with ``Last-Event-ID`` (browsers do it by themselves) gets exactly the
events it missed, from the tenant's bounded history. Comment lines every ``heartbeat``
seconds keep proxies from closing an idle stream; ``Cache-Control: no-cache`` and
``X-Accel-Buffering: no`` keep caches and proxies from holding it back, and
sse-starlette never compresses it. A client that cannot keep up (its queue of
``send_queue_limit`` frames is full) gets an ``evicted`` event and the stream ends; one
that takes nothing for ``send_timeout`` seconds is cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import orjson
from sse_starlette.event import ServerSentEvent
from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from freshcache.core.keys import InvalidKeyPart
from freshcache.realtime.collector import CollectorFreezer
from freshcache.realtime.fanout import Fanout, LocalRoom, Member, RealtimeStats, RoomDelivery
from freshcache.realtime.history import Position, RoomHistory, RoomMessage, offset_position
from freshcache.realtime.rooms import SLOW_CONSUMER, Authenticate, tenant_channel
from freshcache.stores.base import StoreUnavailable

__all__ = ["MetricsLoader", "TenantStreams", "sse_frame"]

logger = logging.getLogger(__name__)

MetricsLoader = Callable[[str], Awaitable[dict[str, Any]]]
"""Tenant id -> the dashboard figures to send."""

TENANT_STREAM = "events"
"""The name of a tenant's stream of critical events, inside its tenant scope."""


def sse_frame(event: str, data_json: str, event_id: str | None) -> bytes:
    """One SSE event. ``data_json`` is one line of JSON (orjson never writes newlines)."""
    head = "" if event_id is None else f"id: {event_id}\n"
    return f"{head}event: {event}\ndata: {data_json}\n\n".encode()


def _encode(message: RoomMessage) -> bytes:
    return sse_frame(message.event, message.payload, message.offset)


class _Stream:
    """One stream: its queue (bounded by ``limit`` for live frames; ``None`` ends the
    stream) and its room."""

    __slots__ = ("limit", "queue", "room")

    def __init__(self, room: LocalRoom[bytes], limit: int) -> None:
        self.room = room
        self.limit = limit
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def put(self, frame: bytes) -> bool:
        if self.queue.qsize() >= self.limit:
            return False
        self.queue.put_nowait(frame)
        return True

    def push(self, frame: bytes) -> None:
        self.queue.put_nowait(frame)

    def end(self, last_frame: bytes) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(last_frame)
        self.queue.put_nowait(None)


class TenantStreams:
    """The SSE endpoint and the per-tenant metrics tickers of this instance."""

    def __init__(
        self,
        fanout: Fanout,
        history: RoomHistory,
        stats: RealtimeStats,
        *,
        authenticate: Authenticate,
        metrics: MetricsLoader | None,
        interval: float = 30.0,
        heartbeat: float = 15.0,
        send_queue_limit: int = 256,
        send_timeout: float = 30.0,
        collector: CollectorFreezer | None = None,
    ) -> None:
        self.fanout = fanout
        self.collector = collector
        self.history = history
        self.stats = stats
        self.authenticate = authenticate
        self.metrics = metrics
        self.interval = interval
        self.heartbeat = heartbeat
        self.send_queue_limit = send_queue_limit
        self.send_timeout = send_timeout
        self._tickers: dict[str, asyncio.Task[None]] = {}

    async def endpoint(self, request: Request) -> Response:
        """The Starlette endpoint (``GET``) of a tenant's live stream."""
        tenant = await self._tenant(request)
        if tenant is None:
            return JSONResponse(
                {"error": "invalid or missing bearer token"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        try:
            channel = tenant_channel(tenant, TENANT_STREAM)
        except InvalidKeyPart:
            return JSONResponse({"error": "invalid tenant"}, status_code=403)
        last_event_id = request.headers.get("last-event-id") or None
        if last_event_id is not None:
            try:
                offset_position(last_event_id)
            except ValueError:
                last_event_id = None  # not one of ours: start afresh
        return EventSourceResponse(
            self._stream(tenant, channel, last_event_id),
            headers={"Cache-Control": "no-cache"},
            ping=self.heartbeat,
            ping_message_factory=lambda: ServerSentEvent(comment="heartbeat"),
            sep="\n",
            send_timeout=self.send_timeout,
        )

    async def _tenant(self, request: Request) -> str | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            token = request.query_params.get("access_token", "")
        if not token.strip():
            return None
        return await self.authenticate(token.strip())

    async def _stream(
        self, tenant: str, channel: str, last_event_id: str | None
    ) -> AsyncIterator[bytes]:
        room = self.fanout.room(
            channel,
            lambda: RoomDelivery(
                _encode, partial(self.resync_snapshot, tenant), self.evict, transport="sse"
            ),
        )
        stream = _Stream(room, self.send_queue_limit)
        member = self.fanout.join(room, stream, stream)
        self.stats.sse_streams += 1
        if self.collector is not None:
            self.collector.opened()
        self._ensure_ticker(tenant)
        try:
            await self._catch_up(room, member, last_event_id)
            # Behind the replayed events, with the offset the stream is at once there.
            stream.push(await self._metrics_frame(tenant, member.position))
            self.fanout.go_live(room, member)
            # The reconnection delay rides on the first event (some parsers take a block
            # of its own for an event).
            first = await stream.queue.get()
            if first is not None:
                yield f"retry: {int(self.heartbeat * 1000)}\n".encode() + first
                while (frame := await stream.queue.get()) is not None:
                    yield frame
        finally:
            self.fanout.leave(stream.room, member)
            self.stats.sse_streams -= 1
            if self.collector is not None:
                self.collector.closed()
            if channel not in self.fanout.rooms:
                self._stop_ticker(tenant)

    async def _catch_up(
        self, room: LocalRoom[bytes], member: Member[bytes], last_event_id: str | None
    ) -> None:
        if last_event_id is not None:
            try:
                replay = await self.history.replay(room.name, last_event_id)
            except StoreUnavailable:
                replay = None
            if replay is not None and replay.recovered:
                member.position = offset_position(last_event_id)
                self.fanout.catch_up(room, member, replay.messages)
                return
        with contextlib.suppress(StoreUnavailable):
            position = await self.history.position(room.name)
            member.position = max(member.position, offset_position(position))

    async def _metrics_frame(self, tenant: str, position: Position) -> bytes:
        data = {} if self.metrics is None else await self.metrics(tenant)
        return sse_frame("metrics", orjson.dumps(data).decode(), _offset_text(position))

    # -- the shared tickers -------------------------------------------------------------

    def _ensure_ticker(self, tenant: str) -> None:
        if self.metrics is None or tenant in self._tickers:
            return
        self._tickers[tenant] = asyncio.get_running_loop().create_task(self._tick(tenant))

    def _stop_ticker(self, tenant: str) -> None:
        task = self._tickers.pop(tenant, None)
        if task is not None:
            task.cancel()

    async def _tick(self, tenant: str) -> None:
        assert self.metrics is not None
        channel = tenant_channel(tenant, TENANT_STREAM)
        while True:
            await asyncio.sleep(self.interval)
            room = self.fanout.rooms.get(channel)
            if room is None:
                return
            try:
                data = await self.metrics(tenant)
            except Exception:
                logger.exception("dashboard metrics for tenant %s failed", tenant)
                continue
            self._offer_metrics(channel, data)

    async def stop(self) -> None:
        for tenant in list(self._tickers):
            self._stop_ticker(tenant)

    def evict(self, member: Member[Any]) -> None:
        """End the stream of ``member``, whose queue is full."""
        stream: _Stream = member.owner
        self.stats.slow_consumers += 1
        self.stats.count_disconnect(SLOW_CONSUMER)
        self.fanout.leave(stream.room, member)
        stream.end(sse_frame("evicted", orjson.dumps({"reason": SLOW_CONSUMER}).decode(), None))

    async def resync_snapshot(self, tenant: str, room: LocalRoom[bytes], position: str) -> None:
        """After a gap in the tenant's events that the history cannot fill: fresh figures."""
        if self.metrics is None:
            return
        data = await self.metrics(tenant)
        at = offset_position(position)
        for member in room.members.values():
            member.position = max(member.position, at)
        self._offer_metrics(room.name, data)

    def _offer_metrics(self, channel: str, data: dict[str, Any]) -> None:
        room = self.fanout.rooms.get(channel)
        if room is not None:
            data_json = orjson.dumps(data).decode()
            self.fanout.offer_each(
                room, lambda position: sse_frame("metrics", data_json, _offset_text(position))
            )


def _offset_text(position: Position) -> str:
    return f"{position[0]}-{position[1]}"
