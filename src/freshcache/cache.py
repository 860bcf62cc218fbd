"""The Cache facade: reads, fills under leases, invalidation and the write strategies.

``get_or_load`` is cache-aside done right: one loader per key in this process
(single-flight) and across processes (the store's lease), stale-while-revalidate, optional
probabilistic early refresh, and no fill that started before an invalidation can store
its value after it. When the store is unreachable, reads fail open: the loader's value is
returned and the error counted.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Generic, Literal, TypeVar

from freshcache.core.keys import CacheKey, Namespace, Tag
from freshcache.core.plan import InvalidationPlan
from freshcache.near import MISSING, NearCache, encode_invalidation
from freshcache.pipeline.broadcast import Broadcast
from freshcache.serialization import JsonSerializer, Serializer
from freshcache.stores.base import Conflict, Entry, Store, StoreUnavailable

__all__ = ["Cache", "CacheRead", "CacheStats"]

T = TypeVar("T")
Loader = Callable[[], Awaitable[T]]

logger = logging.getLogger("freshcache")

# How often a read that lost a fill (its flight's value was invalidated meanwhile) tries
# again before loading without the cache.
_MAX_ATTEMPTS = 3


@dataclass
class CacheStats:
    """Counters of one Cache instance (the monitoring layer exports them)."""

    hits: int = 0
    near_hits: int = 0
    stale_hits: int = 0
    misses: int = 0
    loads: int = 0
    fills_stored: int = 0
    fills_dropped: int = 0
    lease_waits: int = 0
    wait_timeouts: int = 0
    early_refreshes: int = 0
    errors: int = 0
    unconfirmed_broadcasts: int = 0

    def as_dict(self) -> dict[str, int]:
        return {field.name: getattr(self, field.name) for field in fields(self)}


@dataclass(frozen=True, slots=True)
class CacheRead(Generic[T]):
    """A value read through the cache and how it was served: ``hit`` (a fresh cached
    value), ``stale`` (a stale one, being refreshed in the background) or ``miss`` (the
    reader waited for a load)."""

    value: T
    outcome: Literal["hit", "stale", "miss"]


@dataclass(slots=True)
class _Flight:
    """One fill in progress in this process; other readers of the key wait on it."""

    future: asyncio.Future[Any]
    # The near cache's epoch when the flight began: its value may be kept near only if
    # no invalidation arrived since.
    near_epoch: int
    # Whether waiters may use the result: the fill committed under its lease (so no
    # invalidation came between its load and its store) or the store is unreachable.
    shareable: bool = False


class Cache:
    """Cache facade over a :class:`~freshcache.stores.base.Store`.

    Options:

    - ``serializer``: values to bytes and back (orjson by default).
    - ``lease_seconds``: how long a fill may take before its lease lapses (its value is
      then dropped, never stored late). Set it above your slowest loader.
    - ``wait_seconds``: how long a reader waits for another process's fill before loading
      by itself (without storing).
    - ``early_refresh_beta``: probabilistic early refresh (XFetch); 0 turns it off, 1 is
      the usual setting, larger refreshes earlier.
    - ``retry_after``: after the store fails, how long reads skip it (fail open) before
      trying it again.
    - ``broadcast``: tells every instance about this cache's invalidations (and, with
      ``near``, listens to theirs). Call :meth:`start` (or use ``async with``) to listen.
    - ``near``: an in-process :class:`~freshcache.near.NearCache` in front of the store.
    - ``confirm_invalidations``: with a broadcast, each invalidation waits (at most this
      many seconds) until every subscribed instance has dropped its near-cache copies,
      so that a read anywhere after the call returns sees the change; instances that did
      not confirm in time are counted in ``stats.unconfirmed_broadcasts``.
    """

    def __init__(
        self,
        store: Store,
        *,
        serializer: Serializer | None = None,
        lease_seconds: float = 10.0,
        wait_seconds: float = 2.0,
        early_refresh_beta: float = 0.0,
        retry_after: float = 1.0,
        broadcast: Broadcast | None = None,
        near: NearCache | None = None,
        confirm_invalidations: float | None = None,
    ) -> None:
        if lease_seconds <= 0 or wait_seconds < 0 or retry_after < 0:
            raise ValueError("lease_seconds must be > 0; wait_seconds, retry_after >= 0")
        if early_refresh_beta < 0:
            raise ValueError("early_refresh_beta must be >= 0")
        self.store = store
        self.serializer = serializer or JsonSerializer()
        self.lease_seconds = lease_seconds
        self.wait_seconds = wait_seconds
        self.early_refresh_beta = early_refresh_beta
        self.retry_after = retry_after
        self.broadcast = broadcast
        self.near = near
        self.confirm_invalidations = confirm_invalidations
        if broadcast is not None and near is not None:
            broadcast.add_listener(near)
        self.stats = CacheStats()
        self._flights: dict[str, _Flight] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._store_down_until = 0.0

    # -- reads ------------------------------------------------------------------------

    async def get(self, key: CacheKey, default: Any = None) -> Any:
        """The fresh cached value of ``key``, or ``default``."""
        near = self.near
        if near is not None:
            value = near.lookup(key.physical)
            if value is not MISSING:
                self.stats.near_hits += 1
                return value
            epoch = near.epoch
        entry = await self._read(key)
        if entry is None or entry.fresh_until <= time.time():
            self.stats.misses += 1
            return default
        self.stats.hits += 1
        value = self.serializer.loads(entry.payload)
        if near is not None:
            near.keep(key, value, entry.fresh_until, epoch)
        return value

    async def get_many(self, keys: Sequence[CacheKey], default: Any = None) -> list[Any]:
        """``get`` for several keys in one round trip."""
        if not keys or self._store_is_down():
            self.stats.misses += len(keys)
            return [default] * len(keys)
        try:
            entries = await self.store.read_many(keys)
        except StoreUnavailable:
            self._store_failed()
            return [default] * len(keys)
        now = time.time()
        values = []
        for entry in entries:
            if entry is None or entry.fresh_until <= now:
                self.stats.misses += 1
                values.append(default)
            else:
                self.stats.hits += 1
                values.append(self.serializer.loads(entry.payload))
        return values

    async def get_or_load(self, key: CacheKey, loader: Loader[T]) -> T:
        """The cached value of ``key``, loading and storing it on a miss.

        ``loader`` reads the source of truth. Concurrent misses share one load; a stale
        entry within the tier's stale-while-revalidate window is returned at once while
        one background task refreshes it.
        """
        return (await self.read_through(key, loader)).value

    async def read_through(self, key: CacheKey, loader: Loader[T]) -> CacheRead[T]:
        """:meth:`get_or_load`, also telling how the value was served (for metrics and
        ``X-Cache``-style headers): ``hit``, ``stale`` or ``miss``."""
        near = self.near
        for _ in range(_MAX_ATTEMPTS):
            if near is not None:
                kept = near.lookup(key.physical)
                if kept is not MISSING:
                    self.stats.near_hits += 1
                    return CacheRead(kept, "hit")  # type: ignore[arg-type]
                epoch = near.epoch
            entry = await self._read(key)
            if entry is not None:
                now = time.time()
                value: T = self.serializer.loads(entry.payload)
                if entry.fresh_until > now:
                    self.stats.hits += 1
                    if near is not None:
                        near.keep(key, value, entry.fresh_until, epoch)
                    if self._should_refresh_early(entry, now):
                        self.stats.early_refreshes += 1
                        self._refresh_in_background(key, loader)
                    return CacheRead(value, "hit")
                self.stats.stale_hits += 1
                self._refresh_in_background(key, loader)
                return CacheRead(value, "stale")
            self.stats.misses += 1
            flight = self._flights.get(key.physical)
            if flight is None:
                flight = self._start_flight(key)
                return CacheRead(await self._fly(key, loader, flight, wait_for_others=True), "miss")
            result = await asyncio.shield(flight.future)
            if flight.shareable:
                return CacheRead(result, "miss")
            # That fill lost to an invalidation that may precede this read: read again.
        self.stats.loads += 1
        return CacheRead(await loader(), "miss")

    async def _read(self, key: CacheKey) -> Entry | None:
        if self._store_is_down():
            return None
        try:
            return await self.store.read(key)
        except StoreUnavailable:
            self._store_failed()
            return None

    def _should_refresh_early(self, entry: Entry, now: float) -> bool:
        if not self.early_refresh_beta or not entry.compute_seconds:
            return False
        gap = -entry.compute_seconds * self.early_refresh_beta * math.log(1.0 - random.random())
        return now + gap >= entry.fresh_until

    # -- fills ------------------------------------------------------------------------

    def _start_flight(self, key: CacheKey) -> _Flight:
        # Registered before any await, so concurrent readers of the key find it.
        near_epoch = self.near.epoch if self.near is not None else 0
        flight = _Flight(asyncio.get_running_loop().create_future(), near_epoch)
        self._flights[key.physical] = flight
        return flight

    async def _fly(
        self, key: CacheKey, loader: Loader[T], flight: _Flight, *, wait_for_others: bool
    ) -> T:
        """Run the fill of ``flight``; other readers in this process wait on its future."""
        try:
            value = await self._fill(key, loader, flight, wait_for_others)
        except BaseException as error:
            flight.future.set_exception(error)
            flight.future.exception()  # retrieved here: waiters re-raise it themselves
            raise
        else:
            flight.future.set_result(value)
            return value
        finally:
            if self._flights.get(key.physical) is flight:
                del self._flights[key.physical]

    async def _fill(
        self, key: CacheKey, loader: Loader[T], flight: _Flight, wait_for_others: bool
    ) -> T:
        token = os.urandom(12).hex()
        tier = key.tier
        try:
            generation = await self._acquire_or_wait(key, loader, token, flight, wait_for_others)
            if isinstance(generation, _Waited):
                return generation.value  # type: ignore[no-any-return]
            await self.store.register_tags(
                [(key, time.time() + self.lease_seconds + tier.ttl + tier.stale_while_revalidate)]
            )
        except StoreUnavailable:
            self._store_failed()
            flight.shareable = True  # no invalidation can be applied either, meanwhile
            self.stats.loads += 1
            return await loader()
        started = time.perf_counter()
        self.stats.loads += 1
        try:
            value = await loader()
        except BaseException:
            await self._release(key, token)
            raise
        compute_seconds = time.perf_counter() - started
        ttl = tier.jittered_ttl(random.random())
        entry = Entry(self.serializer.dumps(value), time.time() + ttl, compute_seconds)
        try:
            stored = await self.store.commit(
                key, token, generation, entry, ttl + tier.stale_while_revalidate
            )
        except StoreUnavailable:
            self._store_failed()
            return value
        if stored:
            self.stats.fills_stored += 1
            flight.shareable = True
            if self.near is not None:
                self.near.keep(key, value, entry.fresh_until, flight.near_epoch)
        else:
            self.stats.fills_dropped += 1
        return value

    async def _acquire_or_wait(
        self,
        key: CacheKey,
        loader: Loader[Any],
        token: str,
        flight: _Flight,
        wait_for_others: bool,
    ) -> int | _Waited:
        """Take the lease, or wait for the process that holds it to store its value.

        A reader (``wait_for_others``) takes no lease when a value was stored since its
        read: it uses that one, and nobody loads the key twice. A background refresh
        always wants the lease (the value it found is stale)."""
        deadline = time.monotonic() + self.wait_seconds
        delay = 0.002
        while True:
            outcome = await self.store.acquire_lease(
                key, token, self.lease_seconds, unless_stored=wait_for_others
            )
            if isinstance(outcome, Entry):
                # Stored under a lease taken after any invalidation this read follows.
                flight.shareable = True
                return _Waited(self.serializer.loads(outcome.payload))
            if outcome is not None:
                return outcome
            if not wait_for_others:
                return _Waited(None)
            self.stats.lease_waits += 1
            if time.monotonic() >= deadline:
                self.stats.wait_timeouts += 1
                self.stats.loads += 1
                return _Waited(await loader())
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _refresh_in_background(self, key: CacheKey, loader: Loader[Any]) -> None:
        if key.physical in self._flights:
            return
        flight = self._start_flight(key)
        task = asyncio.get_running_loop().create_task(self._background_refresh(key, loader, flight))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _background_refresh(
        self, key: CacheKey, loader: Loader[Any], flight: _Flight
    ) -> None:
        try:
            await self._fly(key, loader, flight, wait_for_others=False)
        except Exception:
            logger.exception("background refresh of %s failed", key.name)

    async def _release(self, key: CacheKey, token: str) -> None:
        try:
            await self.store.release_lease(key, token)
        except StoreUnavailable:
            self._store_failed()

    # -- writes -----------------------------------------------------------------------

    async def set(self, key: CacheKey, value: Any, *, ttl: float | None = None) -> None:
        """Store ``value`` for ``key`` (cache-aside after a database write).

        Cancels any fill of the key in progress, so an older value loaded before this
        write cannot overwrite it. ``ttl`` defaults to the template's tier.
        """
        await self.set_many([(key, value)], ttl=ttl)

    async def set_many(
        self, items: Iterable[tuple[CacheKey, Any]], *, ttl: float | None = None
    ) -> None:
        """``set`` for several keys, pipelined."""
        now = time.time()
        writes = []
        for key, value in items:
            fresh = key.tier.jittered_ttl(random.random()) if ttl is None else ttl
            entry = Entry(self.serializer.dumps(value), now + fresh)
            writes.append((key, entry, fresh + key.tier.stale_while_revalidate))
        if not writes:
            return
        await self.store.register_tags(
            [(key, now + expire + self.lease_seconds) for key, _, expire in writes]
        )
        await self.store.write(writes)
        await self._announce(InvalidationPlan(keys=tuple(key for key, _, _ in writes)))

    async def write_through(
        self, key: CacheKey, value: T, persist: Callable[[T], Awaitable[object]]
    ) -> T:
        """Persist ``value`` with ``persist``, then store it in the cache.

        The write takes the key's lease before persisting, so neither a read's fill nor a
        concurrent write-through that persisted earlier can leave an older value cached;
        when two writes race, the loser's commit deletes the entry instead (the next read
        reloads it). If the store is unreachable, the value is still persisted and
        :class:`StoreUnavailable` is raised so the caller knows the cache was not updated.
        """
        token = os.urandom(12).hex()
        tier = key.tier
        try:
            generation = await self.store.acquire_lease(key, token, self.lease_seconds, steal=True)
            assert isinstance(generation, int)  # a stolen lease is always granted
            await self.store.register_tags(
                [(key, time.time() + self.lease_seconds + tier.ttl + tier.stale_while_revalidate)]
            )
        except StoreUnavailable:
            self._store_failed()
            await persist(value)
            raise
        try:
            await persist(value)
        except BaseException:
            await self._release(key, token)
            raise
        ttl = tier.jittered_ttl(random.random())
        entry = Entry(self.serializer.dumps(value), time.time() + ttl)
        await self.store.commit(
            key,
            token,
            generation,
            entry,
            ttl + tier.stale_while_revalidate,
            conflict=Conflict.INVALIDATE,
        )
        await self._announce(InvalidationPlan(keys=(key,)))
        return value

    # -- invalidation -----------------------------------------------------------------

    async def invalidate_keys(self, *keys: CacheKey) -> None:
        """Delete these entries; fills of them in progress will not be stored."""
        await self._invalidate(InvalidationPlan(keys=keys))

    async def delete(self, key: CacheKey) -> None:
        """Delete one entry (``invalidate_keys`` with one key)."""
        await self._invalidate(InvalidationPlan(keys=(key,)))

    async def invalidate_tags(self, *tags: Tag) -> int:
        """Delete every entry carrying one of ``tags``; return how many keys were purged."""
        return await self._invalidate(InvalidationPlan(tags=tags))

    async def bump_namespace(self, *namespaces: Namespace) -> None:
        """Invalidate every key of these namespaces at once (O(1) each)."""
        await self._invalidate(InvalidationPlan(namespaces=namespaces))

    async def apply(self, plan: InvalidationPlan) -> None:
        """Carry out an invalidation plan (from the dependency rules)."""
        await self._invalidate(plan)

    async def _invalidate(self, plan: InvalidationPlan) -> int:
        """Apply ``plan`` to the store, then to the near caches of every instance."""
        purged = 0
        if plan.namespaces:
            await self.store.bump(plan.namespaces)
        if plan.tags:
            purged = await self.store.purge_tags(plan.tags)
        if plan.keys:
            await self.store.delete(plan.keys)
        await self._announce(plan)
        return purged

    async def _announce(self, plan: InvalidationPlan) -> None:
        keys = [key.physical for key in plan.keys]
        tags = [tag.physical for tag in plan.tags]
        namespaces = [namespace.generation_key for namespace in plan.namespaces]
        if self.near is not None:
            self.near.invalidate(keys, tags, namespaces)
        if self.broadcast is not None:
            missing = await self.broadcast.publish(
                encode_invalidation(keys, tags, namespaces),
                confirm_within=self.confirm_invalidations,
            )
            if missing:
                self.stats.unconfirmed_broadcasts += 1
                logger.warning("%d instances did not confirm an invalidation in time", missing)

    # -- life cycle -------------------------------------------------------------------

    def _store_is_down(self) -> bool:
        if self._store_down_until and time.monotonic() < self._store_down_until:
            self.stats.errors += 1
            return True
        return False

    def _store_failed(self) -> None:
        self.stats.errors += 1
        self._store_down_until = time.monotonic() + self.retry_after
        logger.warning("cache store unavailable; serving from loaders for %ss", self.retry_after)

    async def start(self) -> None:
        """Subscribe to the broadcast (if any), so the near cache starts serving."""
        if self.broadcast is not None:
            await self.broadcast.start()

    async def aclose(self) -> None:
        """Wait for background refreshes, stop listening, then close the store."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self.broadcast is not None:
            await self.broadcast.stop()
        await self.store.close()

    async def __aenter__(self) -> Cache:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


@dataclass(slots=True)
class _Waited:
    """The value another process stored (or a load made without the lease)."""

    value: Any
