"""Cache warming in the service: the most read keys are rebuilt after a namespace bump.

:class:`WarmingCache` is the service's :class:`~freshcache.cache.Cache`. It counts the
reads of products, listing pages and marketplace searches in a
:class:`~freshcache.warming.Warmer`, and when this instance applies an invalidation plan
that bumps a namespace (a product change bumps ``products:{tenantId}`` and
``marketplace:products:search``), the most read keys of that namespace are rebuilt in
the background, before readers ask for them. Bumps that arrive while a warming runs
are gathered into the next one.

The loaders are the routes' own: the service's routes read the database through the
runtime, never through their request, so the loader a key was last read with can
rebuild it after its request ended. The instance remembers one per tracked key (at most
``4 * capacity`` per template, the most recently read).

After a restart the instance knows no popular keys (the counts and the loaders live in
the process), so there is nothing to warm on start-up: with Redis, the shared store
still holds the values across a deploy; with the memory store, the first reads refill it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from freshcache.cache import Cache, CacheRead
from freshcache.core.keys import CacheKey, KeySpace, KeyTemplate, Namespace
from freshcache.core.plan import InvalidationPlan
from freshcache.near import NearCache
from freshcache.pipeline.broadcast import Broadcast
from freshcache.stores.base import Store
from freshcache.warming import Warmer

__all__ = ["WARMED_TEMPLATES", "WarmingCache", "WarmingStats"]

T = TypeVar("T")

logger = logging.getLogger(__name__)

WARMED_TEMPLATES = (
    "product:{tenantId}:{productId}",
    "products:{tenantId}:category:{categoryId}:page:{page}",
    "marketplace:products:search:{query}:{location}",
)
"""The key templates whose reads are counted and whose popular keys are rebuilt."""

# Set inside warming runs: their own reads must not count as popularity.
_warming: ContextVar[bool] = ContextVar("freshcache_warming", default=False)


class _UnknownLoader(LookupError):
    """The key's loader was forgotten (it fell out of the most recently read)."""


@dataclass
class WarmingStats:
    """What warming did on this instance (exported as ``freshcache_warming_total``)."""

    runs: int = 0
    keys: int = 0
    loaded: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, int]:
        return {field.name: getattr(self, field.name) for field in fields(self)}


class WarmingCache(Cache):
    """A :class:`~freshcache.cache.Cache` that warms the popular keys of the namespaces
    its invalidations bump.

    ``capacity`` keys are counted per template, ``top`` are rebuilt at most per warming,
    by ``concurrency`` loads at a time (see :class:`~freshcache.warming.Warmer`).
    """

    def __init__(
        self,
        store: Store,
        keyspace: KeySpace,
        *,
        broadcast: Broadcast | None = None,
        near: NearCache | None = None,
        confirm_invalidations: float | None = None,
        capacity: int = 256,
        top: int = 32,
        concurrency: int = 4,
    ) -> None:
        super().__init__(
            store, broadcast=broadcast, near=near, confirm_invalidations=confirm_invalidations
        )
        templates = [keyspace[name] for name in WARMED_TEMPLATES]
        self._remember_limit = 4 * capacity
        self._loaders: dict[KeyTemplate, OrderedDict[str, Callable[[], Awaitable[Any]]]] = {
            template: OrderedDict() for template in templates
        }
        loaders: Mapping[KeyTemplate, Callable[[CacheKey], Awaitable[Any]]] = dict.fromkeys(
            templates, self._load_remembered
        )
        self.warmer = Warmer(self, loaders, capacity=capacity, top=top, concurrency=concurrency)
        self.warming = WarmingStats()
        self._bumped: dict[str, Namespace] = {}
        self._run: asyncio.Task[None] | None = None

    async def read_through(self, key: CacheKey, loader: Callable[[], Awaitable[T]]) -> CacheRead[T]:
        """``Cache.read_through`` (which ``get_or_load`` uses too), counting the read of a
        warmed template's key."""
        remembered = self._loaders.get(key.template)
        if remembered is not None and not _warming.get():
            remembered[key.physical] = loader
            remembered.move_to_end(key.physical)
            if len(remembered) > self._remember_limit:
                remembered.popitem(last=False)
            self.warmer.track(key)
        return await super().read_through(key, loader)

    async def apply(self, plan: InvalidationPlan) -> None:
        """``Cache.apply``, then (in the background) the warming of the popular keys of
        the namespaces the plan bumped."""
        await super().apply(plan)
        for namespace in plan.namespaces:
            self._bumped[namespace.generation_key] = namespace
        if plan.namespaces and (self._run is None or self._run.done()):
            self._run = asyncio.get_running_loop().create_task(
                self._warm_bumped(), name="freshcache-warming"
            )

    async def _warm_bumped(self) -> None:
        _warming.set(True)  # this task's context only
        while self._bumped:
            namespaces = list(self._bumped.values())
            self._bumped.clear()
            try:
                report = await self.warmer.warm(*namespaces)
            except Exception:
                logger.exception("warming after a bump failed")
                continue
            if report.keys:
                self.warming.runs += 1
                self.warming.keys += report.keys
                self.warming.loaded += report.loaded
                self.warming.failed += report.failed

    async def settled(self) -> None:
        """Wait until the warmings of the bumps applied so far are over."""
        while self._run is not None and not self._run.done():
            await asyncio.shield(self._run)

    async def _load_remembered(self, key: CacheKey) -> Any:
        loader = self._loaders[key.template].get(key.physical)
        if loader is None:
            raise _UnknownLoader(f"no loader remembered for {key.name}")
        return await loader()

    async def aclose(self) -> None:
        """Stop the warming in progress, then close the cache."""
        if self._run is not None:
            self._run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._run
        await self.warmer.aclose()
        await super().aclose()
