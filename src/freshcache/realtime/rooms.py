"""Socket.IO rooms (python-socketio, compatible with the JavaScript socket.io-client v4).

A client connects with ``auth: {token}``; the application's ``authenticate`` turns the
token into a tenant id, or refuses the connection (``connect_error`` with the message
``missing token`` or ``invalid token``). It then emits ``subscribe``
``{"room": "product:<id>", "offset": <last offset seen, optional>}``; the application's
``authorize`` decides, and the acknowledgement is either a refusal
(``{"ok": false, "error": ...}``) or::

    {"ok": true, "room": ..., "recovered": true, "offset": ..., "replayed": n}
    {"ok": true, "room": ..., "recovered": false, "offset": ..., "snapshot": {...}}

When the offset is still in the room's history, the ``n`` messages the client missed
were sent just before the acknowledgement, in order; otherwise the acknowledgement
carries a fresh snapshot from the application. Live messages follow the acknowledgement,
never precede it. Every room message reaches the client as ``event(payload, meta)`` with
``meta = {"room": ..., "offset": ...}``; ``resync(snapshot, meta)`` replaces the room's
state after a gap the history could not fill.

Rooms are scoped to the tenant inside (``t:<tenant>:product:<id>``): a client can only
ever name rooms of its own tenant. Room messages bypass python-socketio's ``emit``: each
is encoded once and put straight into every member's Engine.IO send queue, which is
bounded: a client whose queue is full is disconnected (reason ``slow_consumer``, after an
``evicted`` event) and comes back with its offset.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from functools import partial
from typing import Any

import socketio  # type: ignore[import-untyped]
from engineio import packet as eio_packet  # type: ignore[import-untyped]

from freshcache.core.keys import InvalidKeyPart, escape_part
from freshcache.realtime.collector import CollectorFreezer
from freshcache.realtime.fanout import Fanout, LocalRoom, Member, RealtimeStats, RoomDelivery
from freshcache.realtime.history import RoomHistory, RoomMessage, offset_position
from freshcache.stores.base import StoreUnavailable

__all__ = ["Authenticate", "Authorize", "SnapshotLoader", "SocketRooms", "tenant_channel"]

logger = logging.getLogger(__name__)

Authenticate = Callable[[str], Awaitable[str | None]]
"""Token -> tenant id, or None to refuse."""
Authorize = Callable[[str, str], Awaitable[bool]]
"""(tenant id, room) -> may this tenant's client join the room?"""
SnapshotLoader = Callable[[str, str], Awaitable[dict[str, Any]]]
"""(tenant id, room) -> the room's current state, sent to a joining client."""

_ID = r"[A-Za-z0-9_.~\-]{1,128}"
_EVENT = re.compile(r"[A-Za-z][A-Za-z0-9_.:\-]{0,63}")
SLOW_CONSUMER = "slow_consumer"

# Callbacks to run once python-socketio has queued the acknowledgement of the event being
# handled (see _Server).
_AFTER_ACK: ContextVar[list[Callable[[], None]] | None] = ContextVar("_AFTER_ACK", default=None)


def tenant_channel(tenant: str, name: str) -> str:
    """The internal, tenant-scoped name of a room or stream (the tenant id escaped)."""
    return f"t:{escape_part('tenant', tenant, 256)}:{name}"


def check_event(event: str) -> str:
    if not _EVENT.fullmatch(event):
        raise ValueError(f"invalid event name: {event!r}")
    return event


class _Server(socketio.AsyncServer):  # type: ignore[misc]
    """An AsyncServer that runs callbacks right after an event's acknowledgement is
    queued, so that a subscriber's live messages can never overtake its snapshot."""

    async def _handle_event_internal(
        self, server: Any, sid: str, eio_sid: str, data: Any, namespace: str, id: Any
    ) -> None:
        callbacks: list[Callable[[], None]] = []
        token = _AFTER_ACK.set(callbacks)
        try:
            await super()._handle_event_internal(server, sid, eio_sid, data, namespace, id)
        finally:
            _AFTER_ACK.reset(token)
            for callback in callbacks:
                callback()


class _QueueSink:
    """A connection's Engine.IO send queue, bounded by ``limit`` packets."""

    __slots__ = ("limit", "queue")

    def __init__(self, queue: asyncio.Queue[Any], limit: int) -> None:
        self.queue = queue
        self.limit = limit

    def put(self, frame: Any) -> bool:
        queue = self.queue
        if queue.qsize() >= self.limit:
            return False
        queue.put_nowait(frame)
        return True

    def push(self, frame: Any) -> None:
        self.queue.put_nowait(frame)


class _Connection:
    __slots__ = ("close_reason", "eio_sid", "memberships", "sid", "sink", "socket", "tenant")

    def __init__(self, sid: str, eio_sid: str, socket: Any, tenant: str, limit: int) -> None:
        self.sid = sid
        self.eio_sid = eio_sid
        self.socket = socket
        self.tenant = tenant
        self.sink = _QueueSink(socket.queue, limit)
        self.memberships: dict[str, tuple[LocalRoom[Any], Member[Any]]] = {}
        self.close_reason: str | None = None


def _message_packet(text: str) -> Any:
    """An Engine.IO message carrying Socket.IO packet ``text``, encoded once for all."""
    packet = eio_packet.Packet(eio_packet.MESSAGE, data=text)
    packet.encode()
    return packet


def _room_encoder(room: str) -> Callable[[RoomMessage], Any]:
    # A Socket.IO EVENT ("2") on the main namespace: [event, payload, meta]. Events are
    # checked names and payloads JSON text, so plain concatenation is valid JSON.
    meta = ',{"room":' + json.dumps(room) + ',"offset":"'

    def encode(message: RoomMessage) -> Any:
        return _message_packet(
            '2["' + message.event + '",' + message.payload + meta + message.offset + '"}]'
        )

    return encode


def _event_packet(event: str, *arguments: Any) -> Any:
    return _message_packet("2" + json.dumps([event, *arguments], separators=(",", ":")))


class SocketRooms:
    """The Socket.IO side: connections, subscriptions, room delivery.

    ``send_queue_limit`` bounds each connection's queue (packets); ``collector`` is told
    of connections coming and going. Other keyword options go to python-socketio's
    ``AsyncServer`` (``cors_allowed_origins``, ``ping_interval``, ...).
    """

    def __init__(
        self,
        fanout: Fanout,
        history: RoomHistory,
        stats: RealtimeStats,
        *,
        authenticate: Authenticate,
        authorize: Authorize,
        snapshot: SnapshotLoader,
        room_kinds: Sequence[str] = ("product", "order"),
        send_queue_limit: int = 256,
        collector: CollectorFreezer | None = None,
        **server_options: Any,
    ) -> None:
        self.fanout = fanout
        self.collector = collector
        self.history = history
        self.stats = stats
        self.authenticate = authenticate
        self.authorize = authorize
        self.snapshot = snapshot
        self.send_queue_limit = send_queue_limit
        kinds = "|".join(re.escape(kind) for kind in room_kinds)
        self._room_pattern = re.compile(rf"(?:{kinds}):{_ID}")
        self.server = _Server(
            async_mode="asgi", logger=False, engineio_logger=False, **server_options
        )
        self.server.on("connect", self._connect)
        self.server.on("disconnect", self._disconnect)
        self.server.on("subscribe", self._subscribe)
        self.server.on("unsubscribe", self._unsubscribe)
        self.connections: dict[str, _Connection] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def asgi_app(self, other_app: Any = None, path: str = "socket.io") -> Any:
        """The ASGI app serving Socket.IO at ``/<path>/``, everything else to
        ``other_app``."""
        return socketio.ASGIApp(self.server, other_asgi_app=other_app, socketio_path=path)

    def is_room(self, room: str) -> bool:
        return bool(self._room_pattern.fullmatch(room))

    # -- connections --------------------------------------------------------------------

    async def _connect(self, sid: str, environ: dict[str, Any], auth: Any) -> None:
        token = auth.get("token") if isinstance(auth, dict) else None
        if not isinstance(token, str) or not token:
            self.stats.refused_connections += 1
            raise socketio.exceptions.ConnectionRefusedError("missing token")
        tenant = await self.authenticate(token)
        if tenant is None:
            self.stats.refused_connections += 1
            raise socketio.exceptions.ConnectionRefusedError("invalid token")
        eio_sid = self.server.manager.eio_sid_from_sid(sid, "/")
        socket = self.server.eio.sockets.get(eio_sid)
        if socket is None:  # gone while the token was checked
            raise socketio.exceptions.ConnectionRefusedError("connection closed")
        self.connections[sid] = _Connection(sid, eio_sid, socket, tenant, self.send_queue_limit)
        self.stats.connections += 1
        if self.collector is not None:
            self.collector.opened()

    async def _disconnect(self, sid: str, reason: str = "disconnect") -> None:
        # python-socketio passes the reason since 5.12.
        connection = self.connections.pop(sid, None)
        if connection is None:
            return
        self._leave_all(connection)
        self.stats.connections -= 1
        self.stats.count_disconnect(connection.close_reason or str(reason))
        if self.collector is not None:
            self.collector.closed()

    def _leave_all(self, connection: _Connection) -> None:
        for room, member in connection.memberships.values():
            self.fanout.leave(room, member)
        connection.memberships.clear()

    def evict(self, member: Member[Any]) -> None:
        """Disconnect the client of ``member``, whose send queue is full."""
        connection: _Connection = member.owner
        if connection.close_reason is not None:
            return
        connection.close_reason = SLOW_CONSUMER
        self.stats.slow_consumers += 1
        self._leave_all(connection)
        queue = connection.sink.queue
        # What it could not take is dropped: it replays from its offset when it returns.
        while not queue.empty():
            queue.get_nowait()
            queue.task_done()
        queue.put_nowait(_event_packet("evicted", {"reason": SLOW_CONSUMER}))
        task = asyncio.get_running_loop().create_task(self._close(connection))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, connection: _Connection) -> None:
        # Not eio.disconnect(): it waits for the queue to drain, which a stuck client
        # never does.
        await connection.socket.close(wait=False, abort=False, reason=SLOW_CONSUMER)
        self.server.eio.sockets.pop(connection.eio_sid, None)

    async def close_all(self) -> None:
        for task in list(self._closing):
            task.cancel()
        with contextlib.suppress(Exception):
            await self.server.shutdown()

    # -- subscriptions ------------------------------------------------------------------

    def _refuse(self, error: str) -> dict[str, Any]:
        self.stats.refused_subscriptions += 1
        return {"ok": False, "error": error}

    async def _subscribe(self, sid: str, data: Any) -> dict[str, Any]:
        connection = self.connections.get(sid)
        if connection is None or connection.close_reason is not None:
            return self._refuse("not connected")
        room = data.get("room") if isinstance(data, dict) else None
        offset = data.get("offset") if isinstance(data, dict) else None
        if not isinstance(room, str) or not self.is_room(room):
            return self._refuse("invalid room")
        if offset is not None:
            try:
                offset_position(offset)
            except (TypeError, ValueError):
                return self._refuse("invalid offset")
        try:
            channel = tenant_channel(connection.tenant, room)
        except InvalidKeyPart:
            return self._refuse("invalid tenant")
        if not await self.authorize(connection.tenant, room):
            return self._refuse("forbidden")
        if connection.sid not in self.connections:
            return self._refuse("not connected")
        self._unsubscribe_channel(connection, channel)
        local = self.fanout.room(channel, partial(self._delivery, connection.tenant, room))
        member = self.fanout.join(local, connection.sink, connection)
        connection.memberships[channel] = (local, member)
        try:
            reply = await self._catch_up(connection.tenant, room, local, member, offset)
        except BaseException:
            self._unsubscribe_channel(connection, channel)
            raise
        self._after_ack(partial(self._go_live, connection, channel, member))
        return reply

    async def _catch_up(
        self,
        tenant: str,
        room: str,
        local: LocalRoom[Any],
        member: Member[Any],
        offset: str | None,
    ) -> dict[str, Any]:
        if offset is not None:
            try:
                replay = await self.history.replay(local.name, offset)
            except StoreUnavailable:
                replay = None
            if replay is not None and replay.recovered:
                member.position = offset_position(offset)
                self.fanout.catch_up(local, member, replay.messages)
                last = replay.messages[-1].offset if replay.messages else offset
                return {
                    "ok": True,
                    "room": room,
                    "recovered": True,
                    "offset": last,
                    "replayed": len(replay.messages),
                }
        position: str | None
        try:
            position = await self.history.position(local.name)
        except StoreUnavailable:
            position = None  # no live messages flow now; the snapshot is all there is
        snapshot = await self.snapshot(tenant, room)
        if position is not None:
            member.position = max(member.position, offset_position(position))
        self.stats.snapshots += 1
        return {
            "ok": True,
            "room": room,
            "recovered": False,
            "offset": position,
            "snapshot": snapshot,
        }

    def _delivery(self, tenant: str, room: str) -> RoomDelivery[Any]:
        return RoomDelivery(
            encode=_room_encoder(room),
            resync=partial(self._resync_snapshot, tenant, room),
            evict=self.evict,
            transport="socketio",
        )

    @staticmethod
    def _after_ack(callback: Callable[[], None]) -> None:
        callbacks = _AFTER_ACK.get()
        if callbacks is None:
            callback()
        else:
            callbacks.append(callback)

    def _go_live(self, connection: _Connection, channel: str, member: Member[Any]) -> None:
        membership = connection.memberships.get(channel)
        if membership is not None and membership[1] is member:
            self.fanout.go_live(membership[0], member)

    async def _unsubscribe(self, sid: str, data: Any) -> dict[str, Any]:
        connection = self.connections.get(sid)
        room = data.get("room") if isinstance(data, dict) else None
        if connection is None or not isinstance(room, str) or not self.is_room(room):
            return {"ok": False, "error": "invalid room"}
        self._unsubscribe_channel(connection, tenant_channel(connection.tenant, room))
        return {"ok": True, "room": room}

    def _unsubscribe_channel(self, connection: _Connection, channel: str) -> None:
        membership = connection.memberships.pop(channel, None)
        if membership is not None:
            self.fanout.leave(*membership)

    async def _resync_snapshot(
        self, tenant: str, room: str, local: LocalRoom[Any], position: str
    ) -> None:
        snapshot = await self.snapshot(tenant, room)
        frame = _event_packet("resync", snapshot, {"room": room, "offset": position})
        self.stats.snapshots += 1
        at = offset_position(position)
        for member in list(local.members.values()):
            if member.pending is not None:
                member.pending.append((at, frame))
            elif at > member.position:
                member.position = at
                if not member.sink.put(frame):
                    self.evict(member)
