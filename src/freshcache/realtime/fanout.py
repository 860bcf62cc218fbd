"""Delivery inside one instance: from the fan-out to the connections subscribed here.

Each room with subscribers here is a :class:`LocalRoom`; each subscription a
:class:`Member` holding a :class:`Sink`, the bounded send queue of its connection. A
message is encoded once per room (not per member) and offered to every member's sink; a
sink that is full belongs to a client that cannot keep up, which is evicted instead of
growing memory or delaying the others.

Ordering without gaps or duplicates:

- A member *joins* before its replay or snapshot is read; until it goes live, messages
  for it wait in its ``pending`` list, and those it already got from the replay are
  dropped when it goes live (every member remembers its position).
- When the fan-out subscription drops, every room *resyncs* once it is back: messages
  that arrive meanwhile wait in the room's buffer while the history is read from the
  room's last position; what the history no longer holds is replaced by a snapshot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from freshcache.realtime.history import (
    Position,
    RoomHistory,
    RoomMessage,
    decode_message,
    offset_position,
)
from freshcache.stores.base import StoreUnavailable

__all__ = ["Fanout", "LocalRoom", "Member", "RealtimeStats", "RoomDelivery", "Sink"]

logger = logging.getLogger(__name__)

Frame = TypeVar("Frame")
Frame_contra = TypeVar("Frame_contra", contravariant=True)


class Sink(Protocol[Frame_contra]):
    """The bounded send queue of one connection."""

    def put(self, frame: Frame_contra) -> bool:
        """Queue ``frame``; False (and nothing queued) when the queue is full."""
        ...

    def push(self, frame: Frame_contra) -> None:
        """Queue ``frame`` whatever the queue holds (a replay: bounded by the history)."""
        ...


@dataclass
class RealtimeStats:
    """Counters of the real-time layer (this instance).

    ``disconnects`` counts connections ended by reason (``slow_consumer``: its send queue
    overflowed; otherwise the Socket.IO / SSE reason)."""

    connections: int = 0
    sse_streams: int = 0
    subscriptions: int = 0
    refused_connections: int = 0
    refused_subscriptions: int = 0
    published: int = 0
    deliveries: int = 0
    duplicates_dropped: int = 0
    replayed: int = 0
    snapshots: int = 0
    resyncs: int = 0
    slow_consumers: int = 0
    disconnects: dict[str, int] = field(default_factory=dict)
    delivered_by_transport: dict[str, int] = field(default_factory=dict)
    """Messages queued to members, by the transport of their room (``socketio``, ``sse``)."""
    dropped_by_transport: dict[str, int] = field(default_factory=dict)
    """Messages that did not fit a member's send queue (the member was evicted)."""

    def count_disconnect(self, reason: str) -> None:
        self.disconnects[reason] = self.disconnects.get(reason, 0) + 1

    def count_deliveries(self, transport: str, delivered: int, dropped: int = 0) -> None:
        self.deliveries += delivered
        if delivered:
            self.delivered_by_transport[transport] = (
                self.delivered_by_transport.get(transport, 0) + delivered
            )
        if dropped:
            self.dropped_by_transport[transport] = (
                self.dropped_by_transport.get(transport, 0) + dropped
            )


class Member(Generic[Frame]):
    """One subscription: a sink, its position, and what waits while it joins."""

    __slots__ = ("owner", "pending", "position", "sink")

    def __init__(self, sink: Sink[Frame], owner: Any) -> None:
        self.sink = sink
        self.owner = owner
        self.position: Position = (0, 0)
        self.pending: list[tuple[Position, Frame]] | None = []


@dataclass(frozen=True, slots=True)
class RoomDelivery(Generic[Frame]):
    """How a room's messages reach its members.

    ``encode`` turns a message into the frame every member's sink takes (once per
    message); ``resync(room, position)`` sends the members a fresh snapshot when the
    history cannot fill a gap; ``evict(member)`` disconnects a member whose sink is full
    (it must make the member leave)."""

    encode: Callable[[RoomMessage], Frame]
    resync: Callable[[LocalRoom[Frame], str], Awaitable[None]]
    evict: Callable[[Member[Frame]], None]
    transport: str


class LocalRoom(Generic[Frame]):
    """A room with subscribers on this instance."""

    __slots__ = ("buffer", "delivery", "last", "members", "name")

    def __init__(self, name: str, delivery: RoomDelivery[Frame]) -> None:
        self.name = name
        self.delivery = delivery
        self.members: dict[int, Member[Frame]] = {}
        self.last: Position | None = None
        # Messages held back while the room resyncs after a lost subscription.
        self.buffer: list[RoomMessage] | None = None

    @property
    def last_offset(self) -> str | None:
        return None if self.last is None else f"{self.last[0]}-{self.last[1]}"


class Fanout:
    """This instance's rooms: receives what the history fans out, delivers it to members."""

    def __init__(self, history: RoomHistory, stats: RealtimeStats) -> None:
        self.history = history
        self.stats = stats
        self.rooms: dict[str, LocalRoom[Any]] = {}
        self.subscription = history.subscriber()
        self.subscription.add_listener(self)
        self._resync_task: asyncio.Task[None] | None = None
        self._lost = False
        self._drops = 0

    async def start(self) -> None:
        await self.subscription.start()

    async def stop(self) -> None:
        if self._resync_task is not None:
            self._resync_task.cancel()
        await self.subscription.stop()

    # -- membership ---------------------------------------------------------------------

    def room(self, name: str, delivery: Callable[[], RoomDelivery[Frame]]) -> LocalRoom[Frame]:
        """The local room ``name``, created with ``delivery()`` if it has no members yet."""
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = LocalRoom(name, delivery())
            if self._lost:
                room.buffer = []
        return room

    def join(self, room: LocalRoom[Frame], sink: Sink[Frame], owner: Any) -> Member[Frame]:
        """Add a member that receives nothing until :meth:`go_live`."""
        member = Member(sink, owner)
        room.members[id(sink)] = member
        self.stats.subscriptions += 1
        return member

    def leave(self, room: LocalRoom[Frame], member: Member[Frame]) -> None:
        if room.members.pop(id(member.sink), None) is None:
            return
        self.stats.subscriptions -= 1
        if not room.members and self.rooms.get(room.name) is room:
            del self.rooms[room.name]

    def catch_up(
        self, room: LocalRoom[Frame], member: Member[Frame], messages: tuple[RoomMessage, ...]
    ) -> None:
        """Give a joining member the messages it missed (from the history), in order."""
        for message in messages:
            position = message.position
            if position > member.position:
                member.position = position
                member.sink.push(room.delivery.encode(message))
        self.stats.replayed += len(messages)

    def go_live(self, room: LocalRoom[Frame], member: Member[Frame]) -> None:
        """Send what arrived while the member joined (newer than what it has), then live
        messages as they come."""
        pending, member.pending = member.pending or [], None
        for position, frame in pending:
            if position > member.position:
                member.position = position
                self._offer(room, member, frame)

    # -- delivery -----------------------------------------------------------------------

    def on_message(self, payload: bytes) -> None:
        message = decode_message(payload)
        room = self.rooms.get(message.room)
        if room is None:
            return
        if room.buffer is not None:
            room.buffer.append(message)
            return
        self._deliver(room, message, message.position)

    def _deliver(self, room: LocalRoom[Frame], message: RoomMessage, position: Position) -> None:
        if room.last is not None and position <= room.last:
            self.stats.duplicates_dropped += 1
            return
        room.last = position
        frame = room.delivery.encode(message)
        full: list[Member[Frame]] = []
        delivered = 0
        for member in room.members.values():
            if member.pending is not None:
                member.pending.append((position, frame))
            elif position > member.position:
                member.position = position
                if member.sink.put(frame):
                    delivered += 1
                else:
                    full.append(member)
        self.stats.count_deliveries(room.delivery.transport, delivered, len(full))
        for member in full:
            room.delivery.evict(member)

    def _offer(self, room: LocalRoom[Frame], member: Member[Frame], frame: Frame) -> None:
        if member.sink.put(frame):
            self.stats.count_deliveries(room.delivery.transport, 1)
        else:
            self.stats.count_deliveries(room.delivery.transport, 0, 1)
            room.delivery.evict(member)

    def offer_each(self, room: LocalRoom[Frame], frame_at: Callable[[Position], Frame]) -> None:
        """Send a frame outside the history (a periodic figure, a snapshot) to the live
        members; ``frame_at(position)`` builds it for a member at that position."""
        frames: dict[Position, Frame] = {}
        full: list[Member[Frame]] = []
        delivered = 0
        for member in room.members.values():
            if member.pending is not None:
                continue
            frame = frames.get(member.position)
            if frame is None:
                frame = frames[member.position] = frame_at(member.position)
            if member.sink.put(frame):
                delivered += 1
            else:
                full.append(member)
        self.stats.count_deliveries(room.delivery.transport, delivered, len(full))
        for member in full:
            room.delivery.evict(member)

    # -- a lost subscription ------------------------------------------------------------

    def on_disconnected(self) -> None:
        self._lost = True
        self._drops += 1
        for room in self.rooms.values():
            if room.buffer is None:
                room.buffer = []

    def on_connected(self) -> None:
        if not self._lost:
            return
        self._lost = False
        if self._resync_task is None or self._resync_task.done():
            self._resync_task = asyncio.get_running_loop().create_task(self._resync_all())

    async def _resync_all(self) -> None:
        # A drop during the resync marks the rooms again; go round until none is marked.
        while not self._lost:
            rooms = [room for room in self.rooms.values() if room.buffer is not None]
            if not rooms:
                return
            for room in rooms:
                try:
                    await self._resync(room)
                except StoreUnavailable as error:
                    logger.warning("real-time resync of %s failed: %s", room.name, error)
                    await asyncio.sleep(self.subscription.reconnect_delay)
                    break

    async def _resync(self, room: LocalRoom[Any]) -> None:
        self.stats.resyncs += 1
        drops = self._drops
        if room.last is None:
            replayed: tuple[RoomMessage, ...] | None = ()
        else:
            replay = await self.history.replay(room.name, room.last_offset or "0-0")
            replayed = replay.messages if replay.recovered else None
        if replayed is None:
            position = await self.history.position(room.name)
            await room.delivery.resync(room, position)
            room.last = max(room.last or (0, 0), offset_position(position))
            replayed = ()
        held, room.buffer = room.buffer or [], None
        for message in (*replayed, *held):
            self._deliver(room, message, message.position)
        if self._drops != drops:
            room.buffer = []  # dropped again while reading: what followed may be missing
