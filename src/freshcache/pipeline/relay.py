"""The outbox relay: moves the rows of ``freshcache_outbox`` to the bus, oldest first.

Durability, stated plainly:

- Nothing committed is lost. An event is a row written in the transaction of the change
  (:mod:`freshcache.pipeline.outbox`), so it exists exactly when the change does, and it
  stays until the bus has accepted it: a row is marked sent only after ``publish``
  returned. A writer that dies after its commit leaves its events behind for the relay;
  a relay that dies, or a bus that is down, leaves them unsent for the next attempt.
  Once accepted, an event is as durable as the bus keeps it (see
  :class:`~freshcache.pipeline.bus.RedisStreamBus`).
- Delivery is at-least-once. A relay killed after the bus accepted a batch but before its
  transaction marked the batch sent (or whose commit failed) leaves those rows unsent,
  and they are published again. Consumers must be idempotent by ``eventId`` (the workers
  are): the copy carries the same payload, hence the same ``eventId``.
- Order: rows are published in id order within a batch and batches follow each other in
  id order, for one relay. On PostgreSQL an id is taken at insert, not at commit, so a
  long transaction may commit rows with ids below rows already relayed; they are relayed
  on the next pass (nothing waits for them, nothing skips them). With several relays,
  batches run in parallel and their events interleave on the bus.

Concurrency: on PostgreSQL each batch is read with ``FOR UPDATE SKIP LOCKED`` in the
transaction that marks it sent, so any number of relays can run; each row goes to one of
them (normal operation sends no row twice). On SQLite run a single relay: SQLite has no
row locks, and a second relay would send rows twice (still correct, wasteful).

Wake-up: on PostgreSQL the relay LISTENs on
:data:`~freshcache.pipeline.outbox.NOTIFY_CHANNEL` on a connection of its own and passes
as soon as a trigger's commit notifies it; it also polls every ``poll_interval`` seconds
(a notification sent while the listening connection was down is not replayed: after
reconnecting the relay passes once anyway). SQLite cannot notify other processes: there
the relay polls only, so ``poll_interval`` is the latency to expect.

Retention: sent rows are kept ``retention`` (an hour by default, to answer "did event X go
out, and when?") and then deleted by :meth:`OutboxRelay.purge_sent`, which :meth:`run`
calls every ``purge_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, delete, func, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from freshcache.pipeline.bus import EVENTS_TOPIC, Bus
from freshcache.pipeline.outbox import NOTIFY_CHANNEL, outbox_table
from freshcache.stores.base import StoreUnavailable

__all__ = ["OutboxRelay"]

logger = logging.getLogger(__name__)

# Failures expected from a database or bus that is briefly unreachable or restarting.
_TRANSIENT = (StoreUnavailable, DBAPIError, OSError)
_PURGE_CHUNK = 10_000


class OutboxRelay:
    """Publishes unsent outbox rows to ``topic`` on ``bus`` (by default the topic the
    invalidation workers read), then marks them sent.

    ``engine`` is the database the outbox was installed in (PostgreSQL or SQLite).
    ``batch_size`` rows are moved per transaction. ``poll_interval`` is how often the
    relay looks for rows without being woken (and how often, on PostgreSQL, the listening
    connection is checked). After a failure (bus or database unreachable) the relay waits
    ``retry_base_seconds``, doubling up to ``retry_max_seconds``, and tries again. Sent
    rows older than ``retention`` are deleted every ``purge_interval`` seconds.
    See the module documentation for the guarantees.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        bus: Bus,
        *,
        topic: str = EVENTS_TOPIC,
        batch_size: int = 100,
        poll_interval: float = 1.0,
        retention: timedelta = timedelta(hours=1),
        purge_interval: float = 60.0,
        retry_base_seconds: float = 0.1,
        retry_max_seconds: float = 10.0,
    ) -> None:
        if engine.dialect.name not in ("postgresql", "sqlite"):
            raise ValueError(
                f"the outbox supports postgresql and sqlite, not {engine.dialect.name}"
            )
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.engine = engine
        self.bus = bus
        self.topic = topic
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.retention = retention
        self.purge_interval = purge_interval
        self.retry_base_seconds = retry_base_seconds
        self.retry_max_seconds = retry_max_seconds
        self.relayed = 0
        """Rows published and marked sent by this relay."""
        self.failures = 0
        """Passes that failed (and were retried)."""
        # PostgreSQL locks rows and notifies; SQLite does neither.
        self._postgres = engine.dialect.name == "postgresql"
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()

    async def relay_once(self) -> int:
        """Publish one batch of unsent rows and mark it sent; return how many rows.

        If the bus fails midway, the rows it accepted are marked sent, the others stay
        unsent, and the bus's error is raised.
        """
        failure: StoreUnavailable | None = None
        published: list[int] = []
        next_batch = (
            select(outbox_table.c.id, outbox_table.c.payload)
            .where(outbox_table.c.sent_at.is_(None))
            .order_by(outbox_table.c.id)
            .limit(self.batch_size)
        )
        if self._postgres:
            next_batch = next_batch.with_for_update(skip_locked=True)
        async with self.engine.begin() as connection:
            rows = (await connection.execute(next_batch)).all()
            for row_id, payload in rows:
                try:
                    await self.bus.publish(self.topic, payload.encode())
                except StoreUnavailable as error:
                    failure = error
                    break
                published.append(row_id)
            if published:
                await connection.execute(
                    update(outbox_table)
                    .where(outbox_table.c.id.in_(published))
                    .values(sent_at=self._now())
                )
        self.relayed += len(published)
        if failure is not None:
            raise failure
        return len(published)

    def _now(self, minus: timedelta = timedelta(0)) -> ColumnElement[Any]:
        """The database's current time (less ``minus``), as ``sent_at`` stores it."""
        if self._postgres:
            return func.now() - minus
        # SQLite keeps times as text: one format with milliseconds (CURRENT_TIMESTAMP has
        # whole seconds) keeps the comparison chronological.
        return func.strftime("%Y-%m-%d %H:%M:%f", "now", f"-{minus.total_seconds():.3f} seconds")

    async def purge_sent(self) -> int:
        """Delete the rows sent more than ``retention`` ago; return how many."""
        expired = (
            select(outbox_table.c.id)
            .where(outbox_table.c.sent_at < self._now(minus=self.retention))
            .limit(_PURGE_CHUNK)
            .scalar_subquery()
        )
        purged = 0
        while True:
            # Chunks keep each transaction (and its locks) short.
            async with self.engine.begin() as connection:
                result = await connection.execute(
                    delete(outbox_table).where(outbox_table.c.id.in_(expired))
                )
            purged += result.rowcount
            if result.rowcount < _PURGE_CHUNK:
                return purged

    async def run(self) -> None:
        """Relay until :meth:`stop` is called or the task is cancelled.

        Passes follow each other at once while full batches come back, then wait for a
        notification (PostgreSQL) or ``poll_interval``. Failures are logged and retried
        with capped exponential backoff; nothing is marked sent that the bus did not take.
        """
        listener = asyncio.create_task(self._listen()) if self._postgres else None
        loop = asyncio.get_running_loop()
        next_purge = loop.time()
        failures_in_a_row = 0
        try:
            while not self._stopping.is_set():
                # Cleared before the pass: a notification arriving during it starts
                # the next pass at once.
                self._wake.clear()
                try:
                    relayed = await self.relay_once()
                    if loop.time() >= next_purge:
                        await self.purge_sent()
                        next_purge = loop.time() + self.purge_interval
                except Exception as error:
                    self.failures += 1
                    failures_in_a_row += 1
                    delay = self._backoff(failures_in_a_row)
                    self._log_failure("outbox relay pass", error, delay)
                    # Notifications keep coming while the bus is down; only stop()
                    # cuts the backoff short.
                    await self._sleep(delay, self._stopping)
                    continue
                failures_in_a_row = 0
                if relayed < self.batch_size:
                    await self._sleep(self.poll_interval, self._wake)
        finally:
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener

    def stop(self) -> None:
        """Ask :meth:`run` to return after the pass in progress. A stopped relay does not
        run again."""
        self._stopping.set()
        self._wake.set()

    def _backoff(self, failures_in_a_row: int) -> float:
        # The exponent is bounded so that the float cannot overflow.
        delay: float = self.retry_base_seconds * 2 ** min(failures_in_a_row - 1, 64)
        return min(delay, self.retry_max_seconds)

    @staticmethod
    def _log_failure(what: str, error: Exception, delay: float) -> None:
        if isinstance(error, _TRANSIENT):
            logger.warning("%s failed (%s); retrying in %.2fs", what, error, delay)
        else:
            logger.exception("%s failed; retrying in %.2fs", what, delay)

    @staticmethod
    async def _sleep(seconds: float, interrupted_by: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await interrupted_by.wait()

    # -- PostgreSQL LISTEN ---------------------------------------------------------------

    async def _listen(self) -> None:
        """Keep a connection LISTENing and wake the relay on each notification; reconnect
        with backoff when it drops. Runs until cancelled."""
        failures_in_a_row = 0
        while True:
            try:
                await self._listen_until_lost()
                failures_in_a_row = 0
                logger.warning("outbox listening connection lost; reconnecting")
                await asyncio.sleep(self.retry_base_seconds)
            except Exception as error:
                failures_in_a_row += 1
                delay = self._backoff(failures_in_a_row)
                self._log_failure("listening for outbox notifications", error, delay)
                await asyncio.sleep(delay)

    async def _listen_until_lost(self) -> None:
        async with self.engine.connect() as connection:
            try:
                raw = await connection.get_raw_connection()
                # asyncpg's own connection: SQLAlchemy has no LISTEN API.
                driver: Any = raw.driver_connection
                lost = asyncio.Event()
                driver.add_termination_listener(lambda _connection: lost.set())
                await driver.add_listener(NOTIFY_CHANNEL, self._notified)
                # Commits made while nobody listened sent notifications nobody heard.
                self._wake.set()
                while not lost.is_set():
                    await self._sleep(self.poll_interval, lost)
                    if not lost.is_set():
                        # A connection dropped without the OS noticing (a network
                        # partition) shows only when used; a live one answers at once.
                        await driver.execute("SELECT 1", timeout=max(self.poll_interval, 5.0))
            finally:
                # Never hand a connection with listeners back to the pool.
                await connection.invalidate()

    def _notified(self, *_notification: object) -> None:
        self._wake.set()
