"""Gradual cache warming: rebuild the most read keys before readers ask for them.

The specification's strategy for high-traffic data, and where each step lives:

1. *Detect a cache miss on a popular endpoint*: :meth:`Warmer.track` (or
   :meth:`Warmer.get_or_load`, which calls it) counts reads per key template in bounded
   memory (:class:`~freshcache.core.popularity.SpaceSaving`).
2. *Trigger a background job to rebuild the cache*: after a namespace bump
   (:meth:`Warmer.bump_and_warm`) or on demand, after a deploy (:meth:`Warmer.warm`), the
   most read keys are rebuilt, most popular first, by at most ``concurrency`` loads at a
   time.
3. *Serve stale data temporarily*: a read of an entry past its TTL but within its tier's
   stale-while-revalidate window gets the stale value at once while one background task
   reloads it; that is :meth:`Cache.get_or_load <freshcache.cache.Cache.get_or_load>`.
   After a namespace bump there is nothing stale to serve (the bump is an invalidation),
   which is what warming is for.
4. *Update the cache asynchronously*: warming goes through ``Cache.get_or_load``, so its
   loads take the key's lease and share single-flight with readers: a reader that misses
   while the warmer loads the key waits for that load instead of making a second one (in
   this process, and in others through the lease).
5. *Notify other instances of the new data*: the rebuilt values are in the shared store;
   another instance's next read takes them from there, not from the database (its near
   cache, if any, dropped the old values on the bump's broadcast).

Loaders are declared per key template and rebuild a value from the key's parts alone: a
warming job runs outside any request, so it must not reuse a request's closure (its
database session may be gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from freshcache.cache import Cache
from freshcache.core.keys import CacheKey, KeyTemplate, Namespace
from freshcache.core.popularity import SpaceSaving

__all__ = ["KeyLoader", "WarmReport", "Warmer"]

KeyLoader = Callable[[CacheKey], Awaitable[Any]]
"""Reads the value of a key from the source of truth, given the key (and its parts)."""

logger = logging.getLogger(__name__)


@dataclass
class WarmReport:
    """What one warming did: the keys it went through, the loads it made (the others
    were cached already or loaded by a concurrent reader it waited for), and the keys
    whose load failed (logged; the others are still warmed)."""

    keys: int = 0
    loaded: int = 0
    failed: int = 0


class Warmer:
    """Tracks the most read keys of a :class:`~freshcache.cache.Cache` and rebuilds them.

    Options:

    - ``loaders``: for each key template to track, how to load a key's value.
    - ``capacity``: keys tracked per template (memory is bounded by it); any key read
      more than ``1 / capacity`` of the template's reads is always tracked.
    - ``top``: how many keys a warming rebuilds at most, the most read first.
    - ``concurrency``: loads in flight at once while warming (the database's share).
    - ``half_life_reads``: after this many reads of a template, its counts halve, so
      yesterday's favourites give way to today's.
    """

    def __init__(
        self,
        cache: Cache,
        loaders: Mapping[KeyTemplate, KeyLoader],
        *,
        capacity: int = 1024,
        top: int = 256,
        concurrency: int = 8,
        half_life_reads: int = 100_000,
    ) -> None:
        if capacity < 1 or top < 1 or concurrency < 1 or half_life_reads < 1:
            raise ValueError("capacity, top, concurrency and half_life_reads must be >= 1")
        self.cache = cache
        self.loaders = dict(loaders)
        self.top = top
        self.concurrency = concurrency
        self.half_life_reads = half_life_reads
        self._sketches: dict[KeyTemplate, SpaceSaving[str]] = {
            template: SpaceSaving(capacity) for template in self.loaders
        }
        self._reads_since_decay = dict.fromkeys(self.loaders, 0)
        self._keys: dict[str, CacheKey] = {}  # the tracked keys, by physical key
        self._runs: set[asyncio.Task[WarmReport]] = set()

    def track(self, key: CacheKey) -> None:
        """Count one read of ``key`` (its template must have a loader)."""
        template = key.template
        sketch = self._sketches.get(template)
        if sketch is None:
            raise ValueError(f"no loader for template {template.name!r}: cannot warm its keys")
        physical = key.physical
        if physical not in sketch:
            self._keys[physical] = key
        replaced = sketch.offer(physical)
        if replaced is not None:
            del self._keys[replaced]
        self._reads_since_decay[template] += 1
        if self._reads_since_decay[template] >= self.half_life_reads:
            self._reads_since_decay[template] = 0
            for forgotten in sketch.decay():
                del self._keys[forgotten]

    async def get_or_load(self, key: CacheKey) -> Any:
        """:meth:`track` the read, then ``cache.get_or_load`` with the template's loader."""
        self.track(key)
        return await self.cache.get_or_load(key, functools.partial(self.loaders[key.template], key))

    def popular(self, *namespaces: Namespace) -> list[CacheKey]:
        """The keys a warming would rebuild, most read first: at most ``top``, from
        ``namespaces`` only if any are given."""
        wanted = set(namespaces)
        ranked: list[tuple[int, CacheKey]] = []
        for template, sketch in self._sketches.items():
            if wanted and template.namespace_pattern is None:
                continue
            for counted in sketch.top():
                key = self._keys[counted.item]
                if not wanted or key.namespace in wanted:
                    ranked.append((counted.count, key))
        ranked.sort(key=lambda pair: pair[0], reverse=True)
        return [key for _, key in ranked[: self.top]]

    async def warm(self, *namespaces: Namespace) -> WarmReport:
        """Rebuild the :meth:`popular` keys (of ``namespaces`` if given) that are missing
        from the cache, by at most ``concurrency`` loads at a time, most read first (a
        stale one is served and refreshed in the background, as for any read)."""
        keys = self.popular(*namespaces)
        report = WarmReport(keys=len(keys))
        pending = iter(keys)

        async def rebuild_in_turn() -> None:
            for key in pending:  # shared: each key is taken by one worker
                await self._rebuild(key, report)

        await asyncio.gather(*(rebuild_in_turn() for _ in range(min(self.concurrency, len(keys)))))
        return report

    async def _rebuild(self, key: CacheKey, report: WarmReport) -> None:
        load = self.loaders[key.template]

        async def counted_load() -> Any:
            report.loaded += 1
            return await load(key)

        try:
            await self.cache.get_or_load(key, counted_load)
        except Exception:
            report.failed += 1
            logger.exception("warming %s failed", key.name)

    async def bump_and_warm(self, *namespaces: Namespace) -> asyncio.Task[WarmReport]:
        """Bump ``namespaces`` (every key in them becomes a miss), then rebuild their
        popular keys in the background. Returns once the bump is applied, with the
        warming's task: await it for its :class:`WarmReport`, or let it run."""
        await self.cache.bump_namespace(*namespaces)
        run = asyncio.get_running_loop().create_task(self.warm(*namespaces))
        self._runs.add(run)
        run.add_done_callback(self._runs.discard)
        return run

    async def aclose(self) -> None:
        """Stop the warmings still running."""
        for run in list(self._runs):
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
