"""What one service instance runs: database, cache, bus, and the invalidation pipeline.

Embedded default: SQLite, :class:`MemoryStore`, :class:`MemoryBus`, relay and worker in
this process. Production: PostgreSQL, :class:`RedisStore`, :class:`RedisStreamBus` and a
:class:`RedisBroadcast`, shared by every instance and ``freshcache worker`` process.

Near caches are off unless ``near_cache_ttl`` is set. A write through instance A applies
its invalidation to the shared store before A responds (read-your-writes); with near
caches, the broadcast that drops B's copy must also have been handled before A responds,
so invalidations then wait for every instance's confirmation (``confirm_seconds`` at
most; an instance that does not confirm is counted and clears itself once its dead
subscription is noticed). In the embedded default the store is in-process anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as redis

from freshcache.core.events import Event
from freshcache.core.keys import KeySpace, commerce_keyspace
from freshcache.core.rules import MARKETPLACE_RULES, RuleError, RuleSet
from freshcache.marketplace.database import Database
from freshcache.marketplace.schema import WATCHED_TABLES
from freshcache.marketplace.settings import Settings
from freshcache.marketplace.warming import WarmingCache
from freshcache.near import NearCache
from freshcache.pipeline.broadcast import RedisBroadcast
from freshcache.pipeline.bus import Bus, MemoryBus, RedisStreamBus
from freshcache.pipeline.cdn import PurgeError, VarnishPurger
from freshcache.pipeline.relay import OutboxRelay
from freshcache.pipeline.worker import (
    EVENTS_TOPIC,
    EventListener,
    InvalidationWorker,
    cdn_tags,
)
from freshcache.stores.base import Store, StoreUnavailable
from freshcache.stores.memory import MemoryStore
from freshcache.stores.redis import RedisStore

__all__ = ["Runtime", "SyncStats", "load_rules", "service_keyspace"]

logger = logging.getLogger(__name__)

# A worker's blocking read; the bus client's socket timeout must exceed it.
_BLOCK_SECONDS = 0.5
_STOP_SECONDS = 5.0


def service_keyspace(prefix: str = "fc:") -> KeySpace:
    """The specification's keys (:func:`commerce_keyspace`) plus the service's dashboard."""
    keyspace = commerce_keyspace(prefix)
    keyspace.declare("dashboard:{tenantId}", tier="short")
    return keyspace


def load_rules(settings: Settings, keyspace: KeySpace) -> RuleSet:
    """The dependency rules named by the settings, or the service's packaged ones.

    They must name every event type the service's tables produce (a change the rules do
    not know could not be invalidated): :class:`RuleError` otherwise.
    """
    if settings.rules_path is not None:
        text = settings.rules_path.read_text(encoding="utf-8")
    else:
        text = MARKETPLACE_RULES.read_text(encoding="utf-8")
    rules = RuleSet.from_yaml(text, keyspace)
    produced = {
        f"{watched.entity}.{action}"
        for watched in WATCHED_TABLES
        for action in watched.operations.values()
    }
    missing = sorted(produced - set(rules.events))
    if missing:
        raise RuleError(f"the rules' events section lacks {', '.join(missing)}")
    return rules


@dataclass
class SyncStats:
    """Invalidations a write route applied itself (read-your-writes), and failures."""

    applied: int = 0
    failed: int = 0


class Runtime:
    """The long-lived objects of one instance; :meth:`start` and :meth:`stop` them.

    ``listeners`` get each batch of events the worker applied (the real-time layer).
    """

    def __init__(self, settings: Settings, *, listeners: Sequence[EventListener] = ()) -> None:
        self.settings = settings
        self.keyspace = service_keyspace(settings.key_prefix)
        self.rules = load_rules(settings, self.keyspace)
        self.database = Database(settings.sqlalchemy_url)
        self.bus: Bus
        store: Store
        broadcast = None
        if settings.redis_url is None:
            store, self.bus = MemoryStore(), MemoryBus()
        else:
            store = RedisStore.from_url(settings.redis_url)
            self.bus = RedisStreamBus(
                redis.Redis.from_url(
                    settings.redis_url,
                    socket_timeout=_BLOCK_SECONDS + 5.0,
                    socket_connect_timeout=2.0,
                )
            )
            # Tells near caches elsewhere (e.g. in other services) about invalidations.
            broadcast = RedisBroadcast.from_url(settings.redis_url)
        near = None
        if broadcast is not None and settings.near_cache_ttl > 0:
            near = NearCache(ttl=settings.near_cache_ttl)
        # Rebuilds the most read products, pages and searches after a namespace bump.
        self.cache = WarmingCache(
            store,
            self.keyspace,
            broadcast=broadcast,
            near=near,
            # With near caches, an invalidation returns once every instance dropped its
            # copies: read-your-writes across instances holds for them too.
            confirm_invalidations=settings.confirm_seconds if near is not None else None,
        )
        # The relay reads rows, then marks them sent: a writer's transaction.
        self.relay = OutboxRelay(
            self.database.writer, self.bus, poll_interval=settings.relay_poll_interval
        )
        # Unique per instance: several instances may share a host and even a process.
        consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        # The CDN in front of the service, purged by surrogate key (the names of the keys,
        # tags and namespaces a change invalidates, which responses carry).
        self.purger = VarnishPurger(list(settings.varnish_urls)) if settings.varnish_urls else None
        self.worker = InvalidationWorker(
            self.bus,
            self.rules,
            self.cache,
            purger=self.purger,
            consumer=consumer,
            listeners=listeners,
        )
        self.sync = SyncStats()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Create the schema, connect, and start the relay and worker (if configured)."""
        if self.settings.database_url is None:
            self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        await self.database.create_schema()
        await self.cache.start()
        if self.settings.run_pipeline:
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self.relay.run(), name="freshcache-relay"),
                loop.create_task(
                    self.worker.run(block_seconds=_BLOCK_SECONDS), name="freshcache-worker"
                ),
            ]

    async def stop(self) -> None:
        """Stop the pipeline (each task finishes its pass), then close every connection."""
        self.relay.stop()
        self.worker.stop()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=_STOP_SECONDS + _BLOCK_SECONDS)
            for task in pending:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._tasks = []
        await self.cache.aclose()
        if self.purger is not None:
            await self.purger.close()
        await self.bus.close()
        await self.database.dispose()

    async def changed(self, *events: Event) -> None:
        """Apply the invalidation plans of committed changes now, before the route
        responds, so that the next read on any instance sees the change.

        The outbox delivers the same events to the workers, which apply them again
        (harmless); so if the store cannot be reached now, the change is still
        invalidated once the pipeline gets through, and the write is not reported as
        failed (it is committed).
        """
        for event in events:
            plan = self.rules.plan(event)
            try:
                await self.cache.apply(plan)
                if self.purger is not None:
                    await self.purger.purge_tags(cdn_tags(plan))
                self.sync.applied += 1
            except (StoreUnavailable, PurgeError) as error:
                self.sync.failed += 1
                logger.warning("could not invalidate %s now (%s)", event.event_type, error)

    async def publish(self, event: Event) -> None:
        """Put an application event on the bus, for every worker."""
        await self.bus.publish(EVENTS_TOPIC, event.to_json())
