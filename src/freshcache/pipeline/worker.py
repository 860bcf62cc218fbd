"""Workers: from events on the bus to every cache layer.

An :class:`InvalidationWorker` reads events (from the outbox relay or from the
application), turns each into an :class:`~freshcache.core.plan.InvalidationPlan` with the
dependency rules, and carries the batch's plans out as one: the store (key deletes, tag
purges, namespace bumps), every instance's near cache (the cache's broadcast) and the CDN.
Only then are the events acknowledged.

- At-least-once and idempotent: an event seen again (same ``eventId``) is acknowledged
  without work; applying an invalidation twice is harmless anyway.
- Coalescing: a batch's plans are merged, so a bulk update of 10,000 products bumps
  ``products:{tenant}`` once per batch, not 10,000 times (``stats.coalesced`` counts the
  targets saved).
- Failures: a batch whose application fails is retried with backoff; an event that failed
  ``max_attempts`` times, or cannot be read at all, goes to the dead-letter topic with the
  reason, from where it can be listed and replayed (``freshcache deadletters``).
- A worker that dies leaves its batch pending; another claims it after
  ``claim_idle_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, fields

import orjson

from freshcache.cache import Cache
from freshcache.core.events import Event, InvalidEvent, parse_event
from freshcache.core.plan import InvalidationPlan
from freshcache.core.rules import RuleSet
from freshcache.pipeline.bus import EVENTS_TOPIC, Bus, GroupNotFound, Message
from freshcache.pipeline.cdn import CdnPurger

__all__ = [
    "DEAD_LETTER_TOPIC",
    "EVENTS_TOPIC",
    "DeadLetter",
    "EventListener",
    "InvalidationWorker",
    "WorkerStats",
    "cdn_tags",
    "list_dead_letters",
    "replay_dead_letters",
]

logger = logging.getLogger(__name__)

DEAD_LETTER_TOPIC = "freshcache:dead-letters"
_REPLAY_GROUP = "freshcache-replay"


def cdn_tags(plan: InvalidationPlan) -> list[str]:
    """The surrogate keys a plan purges from the CDN: the names of its keys, tags and
    namespaces (a response carries its key's ``CacheKey.surrogate_keys``)."""
    return [
        *(key.name for key in plan.keys),
        *(tag.name for tag in plan.tags),
        *(namespace.name for namespace in plan.namespaces),
    ]


@dataclass
class WorkerStats:
    """What a worker did; the monitoring layer exports these."""

    events: int = 0
    batches: int = 0
    duplicates: int = 0
    coalesced: int = 0
    failures: int = 0
    dead_lettered: int = 0

    def as_dict(self) -> dict[str, int]:
        return {field.name: getattr(self, field.name) for field in fields(self)}


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event set aside: its original payload, why, and where it came from."""

    message_id: str
    payload: bytes
    reason: str
    source_topic: str
    failed_at: float

    @classmethod
    def from_message(cls, message: Message) -> DeadLetter:
        record = orjson.loads(message.payload)
        return cls(
            message_id=message.id,
            payload=record["payload"].encode(),
            reason=record["reason"],
            source_topic=record["topic"],
            failed_at=record["failedAt"],
        )


EventListener = Callable[[Sequence[Event]], Awaitable[None]]
"""Called with a batch's events once their invalidations are applied (e.g. the real-time
layer pushing stock updates). A listener that raises fails the batch, which is retried:
listeners must tolerate seeing an event again."""


class InvalidationWorker:
    """Applies the events of ``topic`` with ``rules`` to ``cache`` (and ``purger``), then
    hands them to ``listeners``.

    Several workers (any processes) share the consumer ``group``; ``consumer`` names this
    one (hostname-pid by default).
    """

    def __init__(
        self,
        bus: Bus,
        rules: RuleSet,
        cache: Cache,
        *,
        purger: CdnPurger | None = None,
        listeners: Sequence[EventListener] = (),
        topic: str = EVENTS_TOPIC,
        group: str = "freshcache-workers",
        consumer: str | None = None,
        dead_letter_topic: str = DEAD_LETTER_TOPIC,
        batch_size: int = 500,
        max_attempts: int = 5,
        claim_idle_seconds: float = 30.0,
        retry_delay: float = 0.1,
        max_retry_delay: float = 5.0,
        remember_events: int = 100_000,
    ) -> None:
        if batch_size < 1 or max_attempts < 1:
            raise ValueError("batch_size and max_attempts must be >= 1")
        self.bus = bus
        self.rules = rules
        self.cache = cache
        self.purger = purger
        self.listeners = tuple(listeners)
        self.topic = topic
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.dead_letter_topic = dead_letter_topic
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.claim_idle_seconds = claim_idle_seconds
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self.stats = WorkerStats()
        self._remember_events = remember_events
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._retrying: list[Message] = []
        self._attempts: dict[str, int] = {}
        self._group_ready = False
        self._next_claim = 0.0
        self._stopping = asyncio.Event()

    async def process_once(self, *, block_seconds: float = 0.0) -> int:
        """Handle one batch; return how many messages it acknowledged."""
        messages = await self._take(block_seconds)
        if not messages:
            return 0
        self.stats.batches += 1
        plans: list[InvalidationPlan] = []
        events: list[Event] = []
        done: list[str] = []
        for message in messages:
            event = await self._accept(message)
            if event is None:
                done.append(message.id)
                continue
            try:
                plan = self.rules.plan(event)
            except InvalidEvent as error:
                await self._dead_letter(message, f"invalid event: {error}")
                done.append(message.id)
                continue
            plans.append(plan)
            events.append(event)
        set_aside = set(done)
        applied = [message for message in messages if message.id not in set_aside]
        if applied:
            merged = InvalidationPlan.merge(*plans)
            self.stats.coalesced += sum(_size(plan) for plan in plans) - _size(merged)
            try:
                await self._apply(merged)
                for listener in self.listeners:
                    await listener(events)
            except Exception as error:
                await self._ack(done)
                return len(done) + await self._failed(applied, error)
            for event in events:
                self._remember(event.event_id)
            self.stats.events += len(events)
            done.extend(message.id for message in applied)
            for message in applied:
                self._attempts.pop(message.id, None)
        await self._ack(done)
        return len(done)

    async def _take(self, block_seconds: float) -> list[Message]:
        if not self._group_ready:
            await self.bus.ensure_group(self.topic, self.group)
            self._group_ready = True
        if self._retrying:
            batch, self._retrying = self._retrying, []
            return batch
        try:
            # Orphaned messages can only appear claim_idle_seconds after their delivery:
            # looking for them more often than that costs a round trip per batch for nothing.
            if time.monotonic() >= self._next_claim:
                claimed = await self.bus.claim_stale(
                    self.topic, self.group, self.consumer, self.claim_idle_seconds, self.batch_size
                )
                if len(claimed) < self.batch_size:
                    self._next_claim = time.monotonic() + self.claim_idle_seconds / 2
                if claimed:
                    return claimed
            return await self.bus.read(
                self.topic, self.group, self.consumer, self.batch_size, block_seconds
            )
        except GroupNotFound:
            # The bus lost the group (a Redis restart without persistence): recreate it.
            logger.warning("consumer group %s vanished; recreating it", self.group)
            self._group_ready = False
            return []

    async def _accept(self, message: Message) -> Event | None:
        """The message's event, or None when it was dead-lettered or already applied."""
        try:
            event = parse_event(message.payload)
        except InvalidEvent as error:
            await self._dead_letter(message, f"malformed event: {error}")
            return None
        if event.event_id in self._seen:
            self.stats.duplicates += 1
            return None
        attempts = self._attempts.get(message.id, message.deliveries - 1)
        if attempts >= self.max_attempts:
            await self._dead_letter(message, f"failed {attempts} times")
            return None
        return event

    async def _apply(self, plan: InvalidationPlan) -> None:
        await self.cache.apply(plan)
        if self.purger is not None:
            tags = cdn_tags(plan)
            if tags:
                await self.purger.purge_tags(tags)

    async def _failed(self, messages: list[Message], error: Exception) -> int:
        """Keep the batch for another attempt after a pause; nothing is acknowledged."""
        self.stats.failures += 1
        attempt = 0
        for message in messages:
            attempt = self._attempts.get(message.id, message.deliveries - 1) + 1
            self._attempts[message.id] = attempt
        logger.warning("applying %d events failed (attempt %d): %s", len(messages), attempt, error)
        self._retrying = messages
        delay = min(self.retry_delay * 2 ** (attempt - 1), self.max_retry_delay)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stopping.wait()
        return 0

    async def _dead_letter(self, message: Message, reason: str) -> None:
        logger.error("dead-lettering %s: %s", message.id, reason)
        record = {
            "payload": message.payload.decode("utf-8", "replace"),
            "reason": reason,
            "topic": message.topic,
            "messageId": message.id,
            "failedAt": time.time(),
        }
        await self.bus.publish(self.dead_letter_topic, orjson.dumps(record))
        self._attempts.pop(message.id, None)
        self.stats.dead_lettered += 1

    async def _ack(self, ids: Sequence[str]) -> None:
        if ids:
            await self.bus.ack(self.topic, self.group, ids)

    def _remember(self, event_id: str) -> None:
        self._seen[event_id] = None
        if len(self._seen) > self._remember_events:
            self._seen.popitem(last=False)

    async def run(self, *, block_seconds: float = 1.0) -> None:
        """Process batches until :meth:`stop`; a failing bus is retried with backoff.
        A stopped worker does not run again (a stop that comes before the run began
        still counts)."""
        delay = self.retry_delay
        while not self._stopping.is_set():
            try:
                await self.process_once(block_seconds=block_seconds)
                delay = self.retry_delay
            except Exception as error:
                logger.warning("worker could not reach the bus: %s", error)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stopping.wait()
                delay = min(delay * 2, self.max_retry_delay)

    def stop(self) -> None:
        self._stopping.set()


def _size(plan: InvalidationPlan) -> int:
    return len(plan.keys) + len(plan.tags) + len(plan.namespaces)


async def list_dead_letters(
    bus: Bus, count: int = 100, topic: str = DEAD_LETTER_TOPIC
) -> list[DeadLetter]:
    """The oldest ``count`` dead letters not replayed yet."""
    await bus.ensure_group(topic, _REPLAY_GROUP)
    messages = await bus.peek(topic, _REPLAY_GROUP, count)
    return [DeadLetter.from_message(message) for message in messages]


async def replay_dead_letters(
    bus: Bus, count: int = 100, topic: str = DEAD_LETTER_TOPIC
) -> list[DeadLetter]:
    """Publish up to ``count`` dead letters back to the topics they came from (in order),
    then acknowledge them; return what was replayed."""
    await bus.ensure_group(topic, _REPLAY_GROUP)
    consumer = f"replay-{socket.gethostname()}-{os.getpid()}"
    messages = await bus.claim_stale(topic, _REPLAY_GROUP, consumer, 0, count)
    if len(messages) < count:
        messages += await bus.read(topic, _REPLAY_GROUP, consumer, count - len(messages), 0)
    letters = [DeadLetter.from_message(message) for message in messages]
    for letter in letters:
        await bus.publish(letter.source_topic, letter.payload)
    await bus.ack(topic, _REPLAY_GROUP, [message.id for message in messages])
    return letters
