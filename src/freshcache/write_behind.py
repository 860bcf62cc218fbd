"""Write-behind caching: write to the cache first, update the database asynchronously.

:class:`WriteBehind` acknowledges a write once it is in the bus and in the cache; readers
see the new value at once. :class:`WriteBehindFlusher` processes (as many as you like, in
any processes) drain the bus into the database in batches through your ``persist``
function, coalescing several writes of one key into the latest.

Guarantees, stated plainly:

- Durability is the bus's. On :class:`~freshcache.pipeline.bus.RedisStreamBus` an
  acknowledged write is as durable as Redis: with AOF ``everysec`` a crash of the Redis
  host loses up to about one second of acknowledged writes (two when the disk stalls);
  a killed redis-server on a host that stays up normally loses nothing, as Redis writes
  the AOF before it replies and the kernel keeps what was written; an asynchronous
  failover to a replica may lose more; without persistence a restart loses everything
  not yet flushed. On
  :class:`~freshcache.pipeline.bus.MemoryBus` writes live only as long as the process.
- Delivery is at-least-once. A flusher acknowledges a batch only after ``persist``
  returned; a flusher that dies or fails leaves its batch pending, to be retried by it or
  claimed by another after ``claim_idle_seconds``. ``persist`` may therefore see a write
  again, and may see it after a newer write of the same key was persisted by another
  flusher. It must be idempotent and keep the newest: an upsert that only replaces an
  older row, compared by :attr:`PendingWrite.position` (e.g. ``ON CONFLICT (key) DO
  UPDATE ... WHERE excluded.position > stored.position``).
- Consistency is eventual: the database lags the cache by the flush delay. Reads through
  the cache see a write at once; readers of the database, and a cache miss that loads
  from it (the entry was evicted or invalidated before the flush), see the older row
  until the flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from freshcache.cache import Cache
from freshcache.core.keys import CacheKey, KeySpace
from freshcache.pipeline.bus import Bus, GroupNotFound, Message, stream_position

__all__ = [
    "DEFAULT_GROUP",
    "DEFAULT_TOPIC",
    "PendingWrite",
    "Persist",
    "WriteBehind",
    "WriteBehindFlusher",
]

logger = logging.getLogger(__name__)

DEFAULT_TOPIC = "freshcache:write-behind"
DEFAULT_GROUP = "freshcache-flushers"


@dataclass(frozen=True, slots=True)
class PendingWrite:
    """A write waiting to reach the database: the latest value of ``key`` in its batch."""

    key: CacheKey
    value: Any
    message_id: str

    @property
    def position(self) -> tuple[int, int]:
        """Where the write stands in the topic: a later write of the key compares greater.
        Store it with the row and replace the row only with a greater one."""
        return stream_position(self.message_id)


Persist = Callable[[list[PendingWrite]], Awaitable[None]]
"""Writes a batch to the database (one transaction, idempotent, newest position wins)."""


class WriteBehind:
    """The writing side: ``await write(key, value)`` puts the write in the bus and the
    cache. Keys must be built from templates of ``keyspace``, the key space the flushers
    rebuild them with.
    """

    def __init__(
        self, cache: Cache, bus: Bus, keyspace: KeySpace, topic: str = DEFAULT_TOPIC
    ) -> None:
        self.cache = cache
        self.bus = bus
        self.keyspace = keyspace
        self.topic = topic
        # Held only while a write of the key is in progress (the writers keep it alive).
        self._key_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    async def write(self, key: CacheKey, value: Any) -> str:
        """Record the write durably, then cache it; return its message id.

        ``value`` must be serializable by orjson. When this returns, the write is
        acknowledged: readers of the cache see it and a flusher will persist it. If it
        raises after the bus accepted the write (the cache store failed), the write still
        reaches the database, but the cache may hold an older value until it expires.
        """
        if key.template.keyspace is not self.keyspace:
            raise ValueError(f"{key.name}: its template is not declared in this keyspace")
        payload = orjson.dumps(
            {"template": key.template.name, "parts": dict(key.parts), "value": value}
        )
        # Bus first: a crash between the two steps then leaves a write that will still
        # be persisted (and the cache, at worst, an older value until it expires). The
        # other order could leave a value in the cache, seen by readers, that never
        # reaches the database.
        # One write per key at a time in this process, so the cache ends with the value
        # the bus holds last. (Writers of one key in different processes can still set
        # the cache out of stream order; the database ends right regardless.)
        async with self._key_locks.setdefault(key.name, asyncio.Lock()):
            message_id = await self.bus.publish(self.topic, payload)
            await self.cache.set(key, value)
        return message_id


@dataclass(frozen=True, slots=True)
class _Batch:
    writes: list[PendingWrite]
    message_ids: list[str]


class WriteBehindFlusher:
    """The database side: drains the write-behind topic into ``persist``.

    Options:

    - ``topic``, ``group``: where writes are read; all flushers of one database share
      the group, so each write goes to one of them.
    - ``consumer``: this flusher's name in the group (default ``<hostname>-<pid>``); give
      every running flusher its own.
    - ``batch_size``: most messages per ``persist`` call.
    - ``claim_idle_seconds``: a write handed to a flusher that has not acknowledged it
      for this long is taken over (its flusher is presumed dead). Keep it above your
      slowest ``persist``, or live flushers' batches get persisted twice.
    - ``block_seconds``: how long ``run`` waits for new writes per read.
    - ``retry_base_seconds``, ``retry_max_seconds``: after a failure ``run`` waits
      ``base * 2**(failures - 1)`` seconds, at most ``max``, before retrying.

    Counters: ``malformed`` (messages that could not be decoded or name an unknown
    template: logged, acknowledged and skipped), ``persisted`` (writes handed to
    ``persist`` successfully), ``failures`` (attempts of ``run`` that failed).
    """

    def __init__(
        self,
        bus: Bus,
        keyspace: KeySpace,
        persist: Persist,
        *,
        topic: str = DEFAULT_TOPIC,
        group: str = DEFAULT_GROUP,
        consumer: str | None = None,
        batch_size: int = 100,
        claim_idle_seconds: float = 30.0,
        block_seconds: float = 1.0,
        retry_base_seconds: float = 0.1,
        retry_max_seconds: float = 30.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if claim_idle_seconds <= 0 or block_seconds < 0:
            raise ValueError("claim_idle_seconds must be > 0 and block_seconds >= 0")
        if not 0 < retry_base_seconds <= retry_max_seconds:
            raise ValueError("need 0 < retry_base_seconds <= retry_max_seconds")
        self.bus = bus
        self.keyspace = keyspace
        self.persist = persist
        self.topic = topic
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.batch_size = batch_size
        self.claim_idle_seconds = claim_idle_seconds
        self.block_seconds = block_seconds
        self.retry_base_seconds = retry_base_seconds
        self.retry_max_seconds = retry_max_seconds
        self.malformed = 0
        self.persisted = 0
        self.failures = 0
        self._group_ready = False
        self._held: _Batch | None = None
        self._stopping = asyncio.Event()

    async def flush_once(self, *, block_seconds: float = 0.0) -> int:
        """Persist one batch and acknowledge it; return how many messages it settled.

        A batch that failed before is retried first, as it was. Otherwise the batch is
        made of stale messages of dead flushers, then new ones (waiting up to
        ``block_seconds`` for some). If ``persist`` raises, the error propagates and the
        batch stays pending, held for the next call.
        """
        if self._held is None:
            messages = await self._take(block_seconds)
            if not messages:
                return 0
            self._held = self._decode(messages)
        batch = self._held
        if batch.writes:
            await self.persist(batch.writes)
            self.persisted += len(batch.writes)
            # Persisted, not yet acknowledged: if the ack fails, the retry persists the
            # same writes again, which persist tolerates.
        try:
            await self.bus.ack(self.topic, self.group, batch.message_ids)
        except GroupNotFound:
            # The batch is persisted; the pending list it sat in vanished with the group.
            self._group_vanished()
        self._held = None
        return len(batch.message_ids)

    async def _take(self, block_seconds: float) -> list[Message]:
        if not self._group_ready:
            await self.bus.ensure_group(self.topic, self.group)
            self._group_ready = True
        try:
            messages = await self.bus.claim_stale(
                self.topic, self.group, self.consumer, self.claim_idle_seconds, self.batch_size
            )
            if len(messages) < self.batch_size:
                messages += await self.bus.read(
                    self.topic,
                    self.group,
                    self.consumer,
                    self.batch_size - len(messages),
                    0.0 if messages else block_seconds,
                )
        except GroupNotFound:
            self._group_vanished()
            return []
        return messages

    def _group_vanished(self) -> None:
        self._group_ready = False
        logger.warning(
            "group %s of %s vanished (server restarted without persistence?); "
            "writes it had not flushed are lost; recreating it",
            self.group,
            self.topic,
        )

    def _decode(self, messages: Sequence[Message]) -> _Batch:
        # Claimed messages precede new ones in stream order (the Bus contract), so the
        # last write of a key seen here is its latest.
        latest: dict[str, PendingWrite] = {}
        for message in messages:
            write = self._pending_write(message)
            if write is None:
                continue
            latest.pop(write.key.name, None)
            latest[write.key.name] = write
        return _Batch(list(latest.values()), [message.id for message in messages])

    def _pending_write(self, message: Message) -> PendingWrite | None:
        try:
            record = orjson.loads(message.payload)
            key = self.keyspace[record["template"]](**record["parts"])
            return PendingWrite(key, record["value"], message.id)
        except (ValueError, KeyError, TypeError) as error:
            # Includes orjson's decode errors, unknown templates and invalid parts (all
            # ValueErrors). Retrying cannot fix such a message; skip it, loudly.
            self.malformed += 1
            logger.error(
                "skipping malformed write-behind message %s on %s: %s",
                message.id,
                self.topic,
                error,
            )
            return None

    async def run(self) -> None:
        """Flush until :meth:`stop` is called or the task is cancelled; failures (of
        ``persist`` or of the bus) are logged and retried with capped exponential backoff.
        """
        failures_in_a_row = 0
        while not self._stopping.is_set():
            try:
                await self.flush_once(block_seconds=self.block_seconds)
            except Exception:
                self.failures += 1
                failures_in_a_row += 1
                # The exponent is bounded so that the float cannot overflow.
                delay = min(
                    self.retry_base_seconds * 2 ** min(failures_in_a_row - 1, 64),
                    self.retry_max_seconds,
                )
                logger.exception("write-behind flush failed; retrying in %.2fs", delay)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stopping.wait()
            else:
                failures_in_a_row = 0

    def stop(self) -> None:
        """Ask :meth:`run` to return after the batch in progress (and the read it may be
        waiting in, at most ``block_seconds``). A stopped flusher does not run again."""
        self._stopping.set()
