"""The event bus: a durable, at-least-once log read by consumer groups.

Writers ``publish`` messages to a topic. Each consumer group receives every message of the
topic once; within a group, each message goes to one consumer, stays *pending* until that
consumer acknowledges it, and can be claimed by another consumer once it has been idle for
a while (its consumer died or is stuck). Consumers must therefore be idempotent: a message
may be handled twice, never zero times.

Two implementations pass the same conformance suite (``tests/test_bus.py``):

- :class:`RedisStreamBus`: Redis Streams (Redis >= 7.0), for several processes and hosts.
- :class:`MemoryBus`: one process (the embedded default), same semantics on asyncio.

Message ids have the Redis stream form ``<milliseconds>-<sequence>`` on both; use
:func:`stream_position` to order them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast, runtime_checkable

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from freshcache.stores.redis import unavailable_on_connection_errors

__all__ = [
    "EVENTS_TOPIC",
    "Bus",
    "GroupNotFound",
    "MemoryBus",
    "Message",
    "RedisStreamBus",
    "stream_position",
]

logger = logging.getLogger(__name__)

EVENTS_TOPIC = "freshcache:events"
"""Where change events travel: the outbox relay and the application publish, workers read."""


class GroupNotFound(LookupError):
    """The consumer group (or its topic) does not exist: call ``ensure_group`` first.

    On Redis this also happens when the server lost the stream (a restart without
    persistence); the consumer should recreate the group and carry on.
    """


@dataclass(frozen=True, slots=True)
class Message:
    """One message as a consumer receives it.

    ``deliveries`` counts how many times the group handed it out (1 on the first read,
    one more on every claim), so a consumer can set aside a message that keeps failing.
    """

    id: str
    topic: str
    payload: bytes
    deliveries: int


def stream_position(message_id: str) -> tuple[int, int]:
    """The order of a message id within its topic: later messages compare greater."""
    milliseconds, _, sequence = message_id.partition("-")
    return int(milliseconds), int(sequence)


@runtime_checkable
class Bus(Protocol):
    """A durable log with consumer groups. Every method may raise
    :class:`~freshcache.stores.base.StoreUnavailable`; the group methods raise
    :class:`GroupNotFound` for a group that was never created.

    A message is retained until every group of its topic has acknowledged it (no group,
    no trimming): a lagging or abandoned group holds the log's memory, so monitor
    ``pending`` and delete groups you retire.
    """

    async def publish(self, topic: str, payload: bytes) -> str:
        """Append ``payload`` to ``topic`` (created on first use); return the message id
        once the backend has accepted it."""
        ...

    async def ensure_group(self, topic: str, group: str) -> None:
        """Create ``group`` on ``topic`` unless it exists (idempotent). A new group starts
        at the oldest retained message, so nothing published before it is skipped."""
        ...

    async def read(
        self, topic: str, group: str, consumer: str, count: int, block_seconds: float
    ) -> list[Message]:
        """Up to ``count`` messages never delivered to ``group`` before, in stream order,
        now pending for ``consumer`` (``deliveries == 1``). Waits up to ``block_seconds``
        for one to arrive when there is none (0: return at once)."""
        ...

    async def claim_stale(
        self, topic: str, group: str, consumer: str, min_idle_seconds: float, count: int
    ) -> list[Message]:
        """Take over up to ``count`` pending messages of any consumer of ``group`` that
        were handed out at least ``min_idle_seconds`` ago, in stream order; each one's
        ``deliveries`` grows by one. Every message returned precedes (in stream order)
        every message a later ``read`` returns."""
        ...

    async def ack(self, topic: str, group: str, ids: Sequence[str]) -> int:
        """Acknowledge messages of ``group``; return how many were pending (unknown or
        already acknowledged ids are ignored)."""
        ...

    async def pending(self, topic: str, group: str) -> int:
        """How many messages ``group`` has not acknowledged yet: those handed out and
        pending plus those not delivered yet. Zero means the group is done."""
        ...

    async def peek(self, topic: str, group: str, count: int) -> list[Message]:
        """The first ``count`` messages ``group`` has not been handed yet, without handing
        them out (``deliveries == 0``): for inspection."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


# -- Redis Streams ----------------------------------------------------------------------

# Acknowledges, then trims what every group has acknowledged. The floor of a group is its
# oldest pending id, or (nothing pending) its last delivered id: everything below it has
# been acknowledged, everything at or above it may still be needed. XTRIM MINID removes
# only ids below the lowest floor, and "~" lets Redis keep a partly trimmable node whole,
# so it can keep more than asked, never less. Floors only move forward (acks, new
# deliveries), so a floor computed here stays safe; the script runs atomically anyway.
# KEYS: stream. ARGV: group, ids...
_ACK_AND_TRIM = """
local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
local function position(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local floor, floor_ms, floor_seq = nil, 0, 0
local found = false
for _, info in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local fields = {}
  for i = 1, #info, 2 do fields[info[i]] = info[i + 1] end
  found = found or fields['name'] == ARGV[1]
  local candidate = fields['last-delivered-id']
  if fields['pending'] > 0 then
    candidate = redis.call('XPENDING', KEYS[1], fields['name'])[2]
  end
  local ms, seq = position(candidate)
  if floor == nil or ms < floor_ms or (ms == floor_ms and seq < floor_seq) then
    floor, floor_ms, floor_seq = candidate, ms, seq
  end
end
if not found then
  return redis.error_reply('NOGROUP no such consumer group')
end
redis.call('XTRIM', KEYS[1], 'MINID', '~', floor)
return acked
"""

# XAUTOCLAIM does not report delivery counts; XPENDING on each claimed id does, and in
# one script both see the same state. Entries trimmed or deleted while pending come back
# in the last element (Redis drops them from the pending list).
# KEYS: stream. ARGV: group, consumer, min idle ms, cursor, count.
_CLAIM = """
local reply = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
                         'COUNT', ARGV[5])
local deliveries = {}
for i, entry in ipairs(reply[2]) do
  deliveries[i] = redis.call('XPENDING', KEYS[1], ARGV[1], entry[1], entry[1], 1)[1][4]
end
return {reply[1], reply[2], deliveries, reply[3]}
"""

_PAYLOAD_FIELD = b"p"
# Lua's unpack() has a stack limit; acknowledge in chunks well below it.
_ACK_CHUNK = 1000


@contextlib.contextmanager
def _translated_errors(topic: str, group: str | None = None) -> Iterator[None]:
    try:
        with unavailable_on_connection_errors():
            yield
    except ResponseError as error:
        text = str(error)
        if group is not None and text.startswith(("NOGROUP", "no such key")):
            raise GroupNotFound(f"no group {group!r} on topic {topic!r}") from error
        raise


def _message(topic: str, entry_id: bytes, fields: Any, deliveries: int) -> Message:
    # XREADGROUP replies map fields to values; Lua replies are flat [field, value, ...].
    if not isinstance(fields, dict):
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
    # An entry someone else added without our field reaches the consumer empty, which
    # the consumer rejects as malformed (and acknowledges) rather than stalling on it.
    return Message(entry_id.decode(), topic, fields.get(_PAYLOAD_FIELD, b""), deliveries)


class RedisStreamBus:
    """A :class:`Bus` on Redis Streams: one stream key per topic (the topic is the key),
    one Redis consumer group per group.

    Every command and script touches the topic's key only, so it runs on Redis Cluster
    unchanged. Pass a ``redis.asyncio.Redis`` or ``RedisCluster`` client created with
    ``decode_responses=False`` and a ``socket_timeout`` above the longest
    ``block_seconds`` you read with (a blocked read otherwise times out as unavailable).

    Retention: the stream is trimmed by acknowledged position after each ``ack``
    (``XTRIM MINID ~`` below the oldest entry some group still needs), never by length:
    ``MAXLEN`` would drop unacknowledged entries whenever consumers fall behind by more
    than the bound. Durability is Redis's: with AOF ``everysec`` a crash of the host loses
    up to about a second of accepted messages, an asynchronous failover may lose more.
    """

    def __init__(self, client: redis.Redis | RedisCluster) -> None:
        self.client = client
        self._ack_and_trim = client.register_script(_ACK_AND_TRIM)
        self._claim = client.register_script(_CLAIM)

    async def publish(self, topic: str, payload: bytes) -> str:
        with _translated_errors(topic):
            message_id = cast(bytes, await self.client.xadd(topic, {_PAYLOAD_FIELD: payload}))
        return message_id.decode()

    async def ensure_group(self, topic: str, group: str) -> None:
        with _translated_errors(topic):
            try:
                await self.client.xgroup_create(topic, group, id="0", mkstream=True)
            except ResponseError as error:
                if not str(error).startswith("BUSYGROUP"):
                    raise

    async def read(
        self, topic: str, group: str, consumer: str, count: int, block_seconds: float
    ) -> list[Message]:
        # BLOCK 0 would mean "forever" to Redis; no BLOCK at all returns at once.
        block = max(1, int(block_seconds * 1000)) if block_seconds > 0 else None
        with _translated_errors(topic, group):
            reply = cast(
                list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None,
                await self.client.xreadgroup(
                    group, consumer, {topic: ">"}, count=count, block=block
                ),
            )
        return [
            _message(topic, entry_id, fields, 1)
            for _stream, entries in reply or ()
            for entry_id, fields in entries
        ]

    async def claim_stale(
        self, topic: str, group: str, consumer: str, min_idle_seconds: float, count: int
    ) -> list[Message]:
        # XAUTOCLAIM scans a bounded stretch of the pending list per call; go on from
        # its cursor until enough are claimed or the whole list was scanned once. The
        # pending list holds only messages in flight, so one pass is cheap.
        claimed: list[Message] = []
        cursor = b"0-0"
        min_idle_ms = int(min_idle_seconds * 1000)
        while len(claimed) < count:
            with _translated_errors(topic, group):
                cursor, entries, deliveries, vanished = await self._claim(
                    keys=[topic],
                    args=[group, consumer, min_idle_ms, cursor, count - len(claimed)],
                )
            if vanished:
                logger.error(
                    "%d pending messages of %s/%s were deleted from the stream before "
                    "being acknowledged: %s",
                    len(vanished),
                    topic,
                    group,
                    [entry_id.decode() for entry_id in vanished],
                )
            claimed += [
                _message(topic, entry_id, fields, int(delivered))
                for (entry_id, fields), delivered in zip(entries, deliveries, strict=True)
            ]
            if cursor == b"0-0":
                break
        return claimed

    async def ack(self, topic: str, group: str, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        acked = 0
        for start in range(0, len(ids), _ACK_CHUNK):
            with _translated_errors(topic, group):
                acked += int(
                    await self._ack_and_trim(
                        keys=[topic], args=[group, *ids[start : start + _ACK_CHUNK]]
                    )
                )
        return acked

    async def _group_info(self, topic: str, group: str) -> dict[str, Any]:
        with _translated_errors(topic, group):
            groups = await self.client.xinfo_groups(topic)
        info = next((info for info in groups if info["name"] == group.encode()), None)
        if info is None:
            raise GroupNotFound(f"no group {group!r} on topic {topic!r}")
        return info

    async def pending(self, topic: str, group: str) -> int:
        info = await self._group_info(topic, group)
        undelivered = info["lag"]
        if undelivered is None:
            # Redis cannot tell the lag when entries were deleted (XDEL) after the
            # group's position; count them instead.
            undelivered = await self._count_after(topic, info["last-delivered-id"])
        return int(info["pending"]) + int(undelivered)

    async def _count_after(self, topic: str, last_id: bytes) -> int:
        counted = 0
        start = b"(" + last_id
        while True:
            with _translated_errors(topic):
                entries = cast(
                    list[tuple[bytes, dict[bytes, bytes]]],
                    await self.client.xrange(topic, min=start, count=1000),
                )
            if not entries:
                return counted
            counted += len(entries)
            start = b"(" + entries[-1][0]

    async def peek(self, topic: str, group: str, count: int) -> list[Message]:
        info = await self._group_info(topic, group)
        with _translated_errors(topic):
            entries = cast(
                list[tuple[bytes, dict[bytes, bytes]]],
                await self.client.xrange(topic, min=b"(" + info["last-delivered-id"], count=count),
            )
        return [_message(topic, entry_id, fields, 0) for entry_id, fields in entries]

    async def close(self) -> None:
        await self.client.aclose()


# -- in process ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Delivery:
    consumer: str
    delivered_at: float
    deliveries: int


@dataclass(slots=True)
class _Group:
    next_sequence: int
    # Insertion order is sequence order: entries are added in delivery order and a
    # claim updates them in place.
    pending: dict[int, _Delivery] = field(default_factory=dict)


@dataclass(slots=True)
class _Topic:
    payloads: dict[int, bytes] = field(default_factory=dict)
    first_sequence: int = 1
    next_sequence: int = 1
    groups: dict[str, _Group] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


def _memory_id(sequence: int) -> str:
    return f"0-{sequence}"


class MemoryBus:
    """A :class:`Bus` inside one process, for the embedded default.

    Same semantics as :class:`RedisStreamBus` (groups, pending messages, delivery counts,
    claims after idle time, blocking reads, trimming of what every group acknowledged),
    but nothing survives the process. Each method completes without awaiting except a
    blocking read's wait, so on one event loop each is atomic. ``clock`` returns
    monotonic seconds (idle times).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._topics: dict[str, _Topic] = {}

    def _group(self, topic: str, group: str) -> tuple[_Topic, _Group]:
        log = self._topics.get(topic)
        state = None if log is None else log.groups.get(group)
        if log is None or state is None:
            raise GroupNotFound(f"no group {group!r} on topic {topic!r}")
        return log, state

    async def publish(self, topic: str, payload: bytes) -> str:
        log = self._topics.setdefault(topic, _Topic())
        sequence = log.next_sequence
        log.payloads[sequence] = bytes(payload)
        log.next_sequence += 1
        # Wake the blocked readers and give later ones a fresh event to wait on.
        log.arrived.set()
        log.arrived = asyncio.Event()
        return _memory_id(sequence)

    async def ensure_group(self, topic: str, group: str) -> None:
        log = self._topics.setdefault(topic, _Topic())
        log.groups.setdefault(group, _Group(next_sequence=log.first_sequence))

    async def read(
        self, topic: str, group: str, consumer: str, count: int, block_seconds: float
    ) -> list[Message]:
        deadline = self._clock() + block_seconds
        while True:
            log, state = self._group(topic, group)
            if state.next_sequence < log.next_sequence:
                return self._deliver(topic, log, state, consumer, count)
            remaining = deadline - self._clock()
            if remaining <= 0:
                return []
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await log.arrived.wait()

    def _deliver(
        self, topic: str, log: _Topic, state: _Group, consumer: str, count: int
    ) -> list[Message]:
        now = self._clock()
        last = min(log.next_sequence, state.next_sequence + count)
        messages = []
        for sequence in range(state.next_sequence, last):
            state.pending[sequence] = _Delivery(consumer, now, 1)
            messages.append(Message(_memory_id(sequence), topic, log.payloads[sequence], 1))
        state.next_sequence = last
        return messages

    async def claim_stale(
        self, topic: str, group: str, consumer: str, min_idle_seconds: float, count: int
    ) -> list[Message]:
        log, state = self._group(topic, group)
        now = self._clock()
        claimed: list[Message] = []
        for sequence, delivery in state.pending.items():
            if len(claimed) >= count:
                break
            if now - delivery.delivered_at < min_idle_seconds:
                continue
            delivery.consumer = consumer
            delivery.delivered_at = now
            delivery.deliveries += 1
            payload = log.payloads[sequence]
            claimed.append(Message(_memory_id(sequence), topic, payload, delivery.deliveries))
        return claimed

    async def ack(self, topic: str, group: str, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        log, state = self._group(topic, group)
        acked = 0
        for message_id in ids:
            if state.pending.pop(stream_position(message_id)[1], None) is not None:
                acked += 1
        self._trim(log)
        return acked

    def _trim(self, log: _Topic) -> None:
        floor = min(
            (next(iter(state.pending), state.next_sequence) for state in log.groups.values()),
            default=log.first_sequence,
        )
        while log.first_sequence < floor:
            del log.payloads[log.first_sequence]
            log.first_sequence += 1

    async def pending(self, topic: str, group: str) -> int:
        log, state = self._group(topic, group)
        return len(state.pending) + log.next_sequence - state.next_sequence

    async def peek(self, topic: str, group: str, count: int) -> list[Message]:
        log, state = self._group(topic, group)
        sequences = range(state.next_sequence, min(log.next_sequence, state.next_sequence + count))
        return [Message(_memory_id(seq), topic, log.payloads[seq], 0) for seq in sequences]

    def retained(self, topic: str) -> int:
        """How many messages ``topic`` holds in memory (published, not yet trimmed)."""
        log = self._topics.get(topic)
        return 0 if log is None else len(log.payloads)

    async def close(self) -> None:
        return None
