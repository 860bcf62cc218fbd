"""Room histories: every room's recent messages, each with an offset, and their fan-out.

Publishing a message to a room appends it to the room's bounded history, which assigns
its *offset*, and sends it to every instance in the same atomic step, so every instance
receives a room's messages in offset order. A subscriber that comes back with the offset
of the last message it saw gets exactly the messages after it (:meth:`RoomHistory.replay`)
while the history still reaches back that far, and is told otherwise.

Offsets have the Redis stream id form ``<milliseconds>-<sequence>`` in both
implementations, so a client cannot tell them apart and :func:`offset_position` orders
them:

- :class:`MemoryHistory`: one process (the embedded default): a deque per room.
- :class:`RedisHistory`: Redis Streams, one per room (``MAXLEN ~``, expiring when idle),
  the fan-out over Redis pub/sub, both in one Lua script.

Each instance listens through its own :class:`~freshcache.pipeline.broadcast.Broadcast`
(``RoomHistory.subscriber()``), which tells it when its subscription dropped and came
back, so it can replay what it may have missed.
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from freshcache.pipeline.broadcast import Broadcast, MemoryBroadcast, MemoryHub, RedisBroadcast
from freshcache.stores.base import StoreUnavailable

__all__ = [
    "MemoryHistory",
    "RedisHistory",
    "Replay",
    "RoomHistory",
    "RoomMessage",
    "decode_message",
    "encode_message",
    "offset_position",
]

Position = tuple[int, int]
_OFFSET = re.compile(r"(\d{1,20})-(\d{1,20})")


def offset_position(offset: str) -> Position:
    """The order of an offset within its room: later messages compare greater.

    Raises ValueError for text that is not an offset."""
    match = _OFFSET.fullmatch(offset)
    if match is None:
        raise ValueError(f"not an offset: {offset!r}")
    return int(match.group(1)), int(match.group(2))


def _offset_text(position: Position) -> str:
    return f"{position[0]}-{position[1]}"


@dataclass(frozen=True, slots=True)
class RoomMessage:
    """One message of a room: ``payload`` is its JSON text, ``offset`` its place."""

    room: str
    offset: str
    event: str
    payload: str

    @property
    def position(self) -> Position:
        return offset_position(self.offset)


@dataclass(frozen=True, slots=True)
class Replay:
    """What a room's history holds after an offset.

    ``recovered`` is False when the history no longer reaches back to that offset (or
    never knew it): some messages after it may be lost, and ``messages`` is empty."""

    recovered: bool
    messages: tuple[RoomMessage, ...] = ()


def encode_message(message: RoomMessage) -> bytes:
    """The fan-out wire form: room, offset and event cannot contain a newline, and the
    JSON payload comes last, whatever it contains."""
    return f"{message.room}\n{message.offset}\n{message.event}\n{message.payload}".encode()


def decode_message(data: bytes) -> RoomMessage:
    room, offset, event, payload = data.decode().split("\n", 3)
    return RoomMessage(room, offset, event, payload)


class RoomHistory(ABC):
    """The bounded history of every room, and the fan-out of its messages.

    Every method may raise :class:`~freshcache.stores.base.StoreUnavailable`.
    """

    @abstractmethod
    async def append(self, room: str, event: str, payload: str) -> RoomMessage:
        """Store a message (``payload`` is JSON text) and send it to every instance; the
        offset is greater than that of every earlier message of ``room``."""

    @abstractmethod
    async def replay(self, room: str, after: str) -> Replay:
        """The messages of ``room`` after offset ``after``, oldest first, if the history
        still holds every one of them."""

    @abstractmethod
    async def position(self, room: str) -> str:
        """The offset of someone who has seen every message of ``room`` so far: the last
        message's offset, or a point in time before any message still to come."""

    @abstractmethod
    def subscriber(self) -> Broadcast:
        """A new listener on the fan-out (one per instance; started and stopped by it),
        whose payloads :func:`decode_message` reads."""

    async def close(self) -> None:  # noqa: B027 - optional hook, the memory history holds nothing
        """Release connections."""


class _Clock:
    """Offsets ``<milliseconds>-<sequence>`` that only grow, even if the wall clock
    steps back."""

    def __init__(self) -> None:
        self.last: Position = (int(time.time() * 1000), 0)

    def next(self) -> Position:
        milliseconds = int(time.time() * 1000)
        if milliseconds > self.last[0]:
            self.last = (milliseconds, 0)
        else:
            self.last = (self.last[0], self.last[1] + 1)
        return self.last


@dataclass(slots=True)
class _MemoryRoom:
    messages: deque[RoomMessage]
    # The position of the newest message dropped from the front (the deque is full).
    trimmed_through: Position | None = None


class MemoryHistory(RoomHistory):
    """Histories in this process: the last ``max_messages`` messages of each of the
    ``max_rooms`` most recently used rooms.

    Offsets from before this history was created (another process, a restart) are never
    recovered. Several instances in one process may share it: each gets its own
    subscriber on its hub.
    """

    def __init__(self, *, max_messages: int = 1000, max_rooms: int = 10_000) -> None:
        self.max_messages = max_messages
        self.max_rooms = max_rooms
        self.hub = MemoryHub()
        self._publisher = MemoryBroadcast(self.hub)
        self._rooms: OrderedDict[str, _MemoryRoom] = OrderedDict()
        self._clock = _Clock()
        # Nothing before this point is known; it grows when a whole room is evicted.
        self._floor: Position = self._clock.last

    async def append(self, room: str, event: str, payload: str) -> RoomMessage:
        message = RoomMessage(room, _offset_text(self._clock.next()), event, payload)
        history = self._rooms.get(room)
        if history is None:
            history = self._rooms[room] = _MemoryRoom(deque())
            if len(self._rooms) > self.max_rooms:
                _, evicted = self._rooms.popitem(last=False)
                self._floor = max(self._floor, evicted.messages[-1].position)
        else:
            self._rooms.move_to_end(room)
        if len(history.messages) == self.max_messages:
            history.trimmed_through = history.messages.popleft().position
        history.messages.append(message)
        # No await between storing and sending: instances see a room's messages in order.
        await self._publisher.publish(encode_message(message))
        return message

    async def replay(self, room: str, after: str) -> Replay:
        position = offset_position(after)
        history = self._rooms.get(room)
        floor = self._floor
        if history is not None and history.trimmed_through is not None:
            floor = max(floor, history.trimmed_through)
        if position < floor or position > self._clock.last:
            return Replay(recovered=False)
        if history is None:
            return Replay(recovered=True)
        missed = tuple(m for m in history.messages if m.position > position)
        return Replay(recovered=True, messages=missed)

    async def position(self, room: str) -> str:
        history = self._rooms.get(room)
        if history is not None:
            return history.messages[-1].offset
        return _offset_text(self._clock.last)

    def subscriber(self) -> Broadcast:
        return MemoryBroadcast(self.hub)


# Appends a message and publishes it in one step, so that pub/sub order is offset order.
# Each entry keeps the id of the one before it (field v), which tells a replay whether
# trimming removed anything after a given offset.
# KEYS: stream. ARGV: max messages, idle seconds, channel, room, event, payload.
_APPEND = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local previous = ''
if #last > 0 then previous = last[1][1] end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
                      'e', ARGV[5], 'p', ARGV[6], 'v', previous)
redis.call('EXPIRE', KEYS[1], ARGV[2])
-- '- ': a broadcast no one waits to see confirmed (freshcache.pipeline.broadcast's wire form)
redis.call('PUBLISH', ARGV[3],
           '- ' .. ARGV[4] .. '\\n' .. id .. '\\n' .. ARGV[5] .. '\\n' .. ARGV[6])
return id
"""

# The entries after ARGV[1] if none of them was trimmed away, else nil. Nothing after
# ``after`` is missing when ``after`` is at or past the first entry kept, or is the id of
# the entry just before it. A stream that does not exist (expired, or lost in a restart)
# recovers nothing.
# KEYS: stream. ARGV: after.
_REPLAY = """
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if #first == 0 then return false end
local function position(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local after_ms, after_seq = position(ARGV[1])
local first_ms, first_seq = position(first[1][1])
local fields = first[1][2]
local previous = ''
for i = 1, #fields, 2 do
  if fields[i] == 'v' then previous = fields[i + 1] end
end
local reaches = after_ms > first_ms or (after_ms == first_ms and after_seq >= first_seq)
if not reaches and previous ~= ARGV[1] then return false end
return redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+')
"""

# The last entry's id; for a room without one, a point just before the server's clock,
# below any id the server will give later.
# KEYS: stream.
_POSITION = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last > 0 then return last[1][1] end
local now = redis.call('TIME')
return tostring(tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - 1) .. '-0'
"""

_REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


class RedisHistory(RoomHistory):
    """Histories in Redis Streams (Redis >= 6.2): the last ``max_messages`` (about: trimming
    is ``MAXLEN ~``, which keeps at least that many) of each room, a room's stream
    expiring after ``idle_seconds`` without a message; messages fan out on ``channel``.

    A Redis that restarts without persistence loses the histories: offsets from before
    are then not recovered (subscribers get a snapshot), never misreported.
    """

    def __init__(
        self,
        url: str,
        *,
        max_messages: int = 1000,
        idle_seconds: int = 86_400,
        prefix: str = "freshcache:rt:",
        channel: str = "freshcache:realtime",
    ) -> None:
        self.url = url
        self.max_messages = max_messages
        self.idle_seconds = idle_seconds
        self.prefix = prefix
        self.channel = channel
        self.client = _client(url)
        self._append = self.client.register_script(_APPEND)
        self._replay = self.client.register_script(_REPLAY)
        self._position = self.client.register_script(_POSITION)

    def _key(self, room: str) -> str:
        return self.prefix + room

    async def append(self, room: str, event: str, payload: str) -> RoomMessage:
        arguments = [self.max_messages, self.idle_seconds, self.channel, room, event, payload]
        offset = await self._call(self._append, room, arguments)
        return RoomMessage(room, offset.decode(), event, payload)

    async def replay(self, room: str, after: str) -> Replay:
        offset_position(after)  # only an offset reaches the script
        entries = await self._call(self._replay, room, [after])
        if entries is None:
            return Replay(recovered=False)
        return Replay(recovered=True, messages=tuple(_entry(room, e) for e in entries))

    async def position(self, room: str) -> str:
        offset: bytes = await self._call(self._position, room, [])
        return offset.decode()

    async def _call(self, script: Any, room: str, arguments: list[Any]) -> Any:
        try:
            return await script(keys=[self._key(room)], args=arguments)
        except _REDIS_ERRORS as error:
            raise StoreUnavailable(f"redis unavailable: {error}") from error

    def subscriber(self) -> Broadcast:
        return RedisBroadcast.from_url(self.url, self.channel)

    async def close(self) -> None:
        await self.client.aclose()


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=1.0,
        socket_timeout=2.0,
        retry=Retry(NoBackoff(), 0),
        decode_responses=False,
    )


def _entry(room: str, entry: list[Any]) -> RoomMessage:
    offset, flat = entry
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    return RoomMessage(room, offset.decode(), fields[b"e"].decode(), fields[b"p"].decode())
