"""The Cache facade on every backend: single-flight, leases, stale-while-revalidate, the
stale-set race for each kind of invalidation, and the write strategies."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from freshcache.cache import Cache
from freshcache.core.keys import CacheKey, KeySpace, commerce_keyspace
from freshcache.core.plan import InvalidationPlan
from freshcache.core.policy import Tier
from freshcache.stores.base import Entry, Store
from freshcache.stores.memory import MemoryStore
from freshcache.stores.redis import RedisStore
from freshcache.testing import RedisServer

KEYSPACE = commerce_keyspace()
PRODUCT = KEYSPACE["product:{tenantId}:{productId}"]
PAGE = KEYSPACE["products:{tenantId}:category:{categoryId}:page:{page}"]

FAST = Tier("fast", ttl=0.2, stale_while_revalidate=30, min_ttl=0, max_ttl=None)
FAST_KEYS = KeySpace(prefix="fast:")
FAST_ITEM = FAST_KEYS.declare("item:{tenantId}:{id}", tier=FAST)


class Source:
    """A source of truth with a version per row; counts loads."""

    def __init__(self) -> None:
        self.version: dict[str, int] = {}
        self.loads = 0

    def loader(self, row: str, gate: asyncio.Event | None = None) -> Callable[[], Awaitable[int]]:
        async def load() -> int:
            self.loads += 1
            value = self.version.get(row, 0)
            if gate is not None:
                await gate.wait()
            return value

        return load


def product(product_id: str = "p1") -> CacheKey:
    return PRODUCT(tenantId="t1", productId=product_id)


async def test_concurrent_misses_share_one_load(store: Store) -> None:
    source = Source()
    cache = Cache(store)
    values = await asyncio.gather(
        *[cache.get_or_load(product(), source.loader("p1")) for _ in range(20)]
    )
    assert values == [0] * 20
    assert source.loads == 1
    assert await cache.get_or_load(product(), source.loader("p1")) == 0
    assert source.loads == 1 and cache.stats.hits >= 1


async def test_one_load_across_processes(store: Store) -> None:
    source = Source()
    gate = asyncio.Event()
    processes = [Cache(store) for _ in range(3)]
    reads = [
        asyncio.create_task(cache.get_or_load(product(), source.loader("p1", gate)))
        for cache in processes
    ]
    await asyncio.sleep(0.05)
    gate.set()
    assert await asyncio.gather(*reads) == [0, 0, 0]
    assert source.loads == 1
    assert sum(cache.stats.lease_waits for cache in processes) >= 2


async def test_the_tag_is_registered_before_the_loader_runs(store: Store) -> None:
    cache = Cache(store)
    seen: list[int] = []

    async def load() -> str:
        seen.append(await store.tag_index_size(product().tags[0]))
        return "value"

    await cache.get_or_load(product(), load)
    assert seen == [1]


Invalidate = Callable[[Cache], Awaitable[Any]]
KINDS: dict[str, tuple[CacheKey, Invalidate]] = {
    "key": (product(), lambda cache: cache.invalidate_keys(product())),
    "tag": (
        product(),
        lambda cache: cache.invalidate_tags(
            KEYSPACE.tag("product:{tenantId}:{productId}", tenantId="t1", productId="p1")
        ),
    ),
    "namespace": (
        PAGE(tenantId="t1", categoryId="c", page=1),
        lambda cache: cache.bump_namespace(
            KEYSPACE.namespace("products:{tenantId}", tenantId="t1")
        ),
    ),
}


@pytest.mark.parametrize("kind", KINDS)
async def test_a_fill_older_than_an_invalidation_is_never_stored(store: Store, kind: str) -> None:
    key, invalidate = KINDS[kind]
    source = Source()
    reader, writer = Cache(store), Cache(store)
    gate = asyncio.Event()
    slow_read = asyncio.create_task(reader.get_or_load(key, source.loader("p1", gate)))
    await asyncio.sleep(0.05)  # the reader has read version 0 and is about to store it
    source.version["p1"] = 1
    await invalidate(writer)
    gate.set()
    assert await slow_read == 0  # that read started before the write: 0 is right for it
    assert reader.stats.fills_dropped == 1
    assert await writer.get(key) is None
    assert await writer.get_or_load(key, source.loader("p1")) == 1


async def test_a_read_after_an_invalidation_does_not_join_an_older_load(store: Store) -> None:
    source = Source()
    cache, writer = Cache(store), Cache(store)
    gate = asyncio.Event()
    first = asyncio.create_task(cache.get_or_load(product(), source.loader("p1", gate)))
    await asyncio.sleep(0.05)
    source.version["p1"] = 1
    await writer.invalidate_keys(product())
    second = asyncio.create_task(cache.get_or_load(product(), source.loader("p1")))
    await asyncio.sleep(0.01)
    gate.set()
    assert await first == 0
    assert await second == 1


async def test_stale_while_revalidate_serves_stale_and_refreshes_once(store: Store) -> None:
    source = Source()
    cache = Cache(store)
    key = FAST_ITEM(tenantId="t1", id="a")
    assert await cache.get_or_load(key, source.loader("a")) == 0
    source.version["a"] = 1
    await asyncio.sleep(0.3)  # past the TTL, inside the stale window
    assert await cache.get(key) is None  # a plain get returns fresh values only
    refresh_may_finish = asyncio.Event()
    refreshing = source.loader("a", refresh_may_finish)
    stale = await asyncio.gather(*[cache.get_or_load(key, refreshing) for _ in range(5)])
    assert stale == [0] * 5
    assert cache.stats.stale_hits == 5
    refresh_may_finish.set()
    await asyncio.sleep(0.05)
    assert source.loads == 2
    assert await cache.get_or_load(key, source.loader("a")) == 1


async def test_probabilistic_early_refresh(store: Store) -> None:
    cache = Cache(store, early_refresh_beta=1e6)
    key = FAST_ITEM(tenantId="t1", id="b")
    loads = 0

    async def slow_load() -> int:
        nonlocal loads
        loads += 1
        await asyncio.sleep(0.01)
        return loads

    assert await cache.get_or_load(key, slow_load) == 1
    assert await cache.get_or_load(key, slow_load) == 1  # fresh: served, refreshed early
    await asyncio.sleep(0.05)
    assert cache.stats.early_refreshes >= 1
    assert await cache.get_or_load(key, slow_load) >= 2


async def test_a_failing_loader_raises_to_every_waiter_and_frees_the_lease(store: Store) -> None:
    cache = Cache(store, wait_seconds=5)

    async def broken() -> int:
        await asyncio.sleep(0.01)
        raise LookupError("database says no")

    results = await asyncio.gather(
        *[cache.get_or_load(product(), broken) for _ in range(3)], return_exceptions=True
    )
    assert all(isinstance(result, LookupError) for result in results)
    other = Cache(store, wait_seconds=5)
    source = Source()
    assert await asyncio.wait_for(other.get_or_load(product(), source.loader("p1")), 1) == 0


async def test_waiting_for_a_stuck_holder_is_bounded(store: Store) -> None:
    assert await store.acquire_lease(product(), "stuck", 30) is not None
    cache = Cache(store, wait_seconds=0.1)
    source = Source()
    assert await cache.get_or_load(product(), source.loader("p1")) == 0
    assert cache.stats.wait_timeouts == 1
    assert await cache.get(product()) is None  # loaded without the lease: not stored


async def test_set_cancels_an_older_fill(store: Store) -> None:
    source = Source()
    reader, writer = Cache(store), Cache(store)
    gate = asyncio.Event()
    slow_read = asyncio.create_task(reader.get_or_load(product(), source.loader("p1", gate)))
    await asyncio.sleep(0.05)
    await writer.set(product(), 7)
    gate.set()
    await slow_read
    assert await writer.get(product()) == 7


async def test_get_many_and_set_many(store: Store) -> None:
    cache = Cache(store)
    page = PAGE(tenantId="t1", categoryId="c", page=1)
    await cache.set_many([(product("a"), {"a": 1}), (page, [1, 2])])
    assert await cache.get_many([product("a"), product("b"), page], default="-") == [
        {"a": 1},
        "-",
        [1, 2],
    ]
    assert await cache.invalidate_tags(product("a").tags[0]) == 1
    assert await cache.get(product("a")) is None


async def test_write_through_stores_what_was_persisted(store: Store) -> None:
    cache = Cache(store)
    database: dict[str, int] = {}

    async def persist(value: int) -> None:
        database["p1"] = value

    assert await cache.write_through(product(), 5, persist) == 5
    assert database == {"p1": 5}
    assert await cache.get(product()) == 5


async def test_racing_write_throughs_never_leave_the_losers_value(store: Store) -> None:
    cache = Cache(store)
    database: dict[str, int] = {}
    first_may_persist = asyncio.Event()

    async def persist_late(value: int) -> None:
        await first_may_persist.wait()
        database["p1"] = value

    async def persist_now(value: int) -> None:
        database["p1"] = value

    first = asyncio.create_task(cache.write_through(product(), 1, persist_late))
    await asyncio.sleep(0.02)
    await cache.write_through(product(), 2, persist_now)  # persisted first, committed first
    first_may_persist.set()
    await first  # persisted last: the database holds 1
    assert database["p1"] == 1
    assert await cache.get(product()) in (None, 1)


async def test_a_failing_persist_leaves_the_cache_alone(store: Store) -> None:
    cache = Cache(store)
    await cache.set(product(), 1)

    async def fail(value: int) -> None:
        raise RuntimeError("constraint violated")

    with pytest.raises(RuntimeError):
        await cache.write_through(product(), 2, fail)
    assert await cache.get(product()) == 1


async def test_apply_carries_out_a_plan(store: Store) -> None:
    cache = Cache(store)
    page = PAGE(tenantId="t1", categoryId="c", page=1)
    await cache.set_many([(product("a"), 1), (product("b"), 2), (product("c"), 3), (page, 4)])
    assert page.namespace is not None
    plan = InvalidationPlan(
        keys=(product("a"),), tags=product("b").tags, namespaces=(page.namespace,)
    )
    await cache.apply(plan)
    assert await cache.get_many([product("a"), product("b"), product("c"), page]) == [
        None,
        None,
        3,
        None,
    ]


@pytest.mark.usefixtures("redis_client")  # a flushed database
async def test_overlapping_purges_of_a_tag_both_cancel_an_older_fill(
    redis_server: RedisServer,
) -> None:
    """A purge must not return while an overlapping purge of the same tag has read the
    index but not yet cancelled the fills it lists (found by bench/race.py)."""
    reader, first_writer, second_writer = (
        Cache(RedisStore.from_url(redis_server.url)) for _ in range(3)
    )
    source = Source()
    gate = asyncio.Event()
    fill = asyncio.create_task(reader.get_or_load(product(), source.loader("p1", gate)))
    await asyncio.sleep(0.05)  # the fill holds the lease, is registered, has read version 0
    source.version["p1"] = 1
    store = first_writer.store
    assert isinstance(store, RedisStore)
    await store._members(keys=[product().tags[0].physical])  # first purge, paused after step 1
    source.version["p1"] = 2
    await second_writer.invalidate_tags(*product().tags)  # the second purge runs to the end
    gate.set()
    await fill
    assert await second_writer.get_or_load(product(), source.loader("p1")) == 2
    for cache in (reader, first_writer, second_writer):
        await cache.aclose()


async def test_a_fill_stored_since_a_miss_is_used_not_loaded_again() -> None:
    """A reader whose miss was overtaken by another process's fill takes that value
    instead of a lease (found by the warming tests: keys were loaded twice)."""

    class DelayedMisses(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.missed = asyncio.Event()
            self.deliver_miss = asyncio.Event()

        async def read(self, key: CacheKey) -> Entry | None:
            found = await super().read(key)
            if found is None and not self.deliver_miss.is_set():
                self.missed.set()
                await self.deliver_miss.wait()
            return found

    store = DelayedMisses()
    source = Source()
    slow_reader = asyncio.create_task(Cache(store).get_or_load(product(), source.loader("p1")))
    await store.missed.wait()  # its read found nothing; the answer is on its way back
    store.deliver_miss.set()
    assert await Cache(store).get_or_load(product(), source.loader("p1")) == 0  # fills it
    assert await slow_reader == 0
    assert source.loads == 1


async def test_read_through_tells_how_a_value_was_served(store: Store) -> None:
    cache = Cache(store)
    key = FAST_ITEM(tenantId="t1", id="outcome")
    source = Source()
    assert (await cache.read_through(key, source.loader("a"))).outcome == "miss"
    assert (await cache.read_through(key, source.loader("a"))).outcome == "hit"
    await asyncio.sleep(0.3)  # past the TTL, inside the stale window
    stale = await cache.read_through(key, source.loader("a"))
    assert (stale.value, stale.outcome) == (0, "stale")
    await cache.aclose()
