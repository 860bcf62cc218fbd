"""Gradual cache warming: the most read keys are rebuilt after a bump, ahead of readers,
through the cache's leases (one load per key), and other instances read them from Redis."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as redis

from freshcache.cache import Cache
from freshcache.core.keys import CacheKey, Namespace, commerce_keyspace
from freshcache.near import NearCache
from freshcache.pipeline.broadcast import RedisBroadcast
from freshcache.stores.base import Store
from freshcache.stores.memory import MemoryStore
from freshcache.stores.redis import RedisStore
from freshcache.testing import RedisServer
from freshcache.warming import Warmer

KEYSPACE = commerce_keyspace()
PAGE = KEYSPACE["products:{tenantId}:category:{categoryId}:page:{page}"]
PRODUCT = KEYSPACE["product:{tenantId}:{productId}"]
USER = KEYSPACE["user:{tenantId}:{userId}:profile"]


def page(number: int, tenant: str = "t1") -> CacheKey:
    return PAGE(tenantId=tenant, categoryId="c1", page=number)


def products(tenant: str = "t1") -> Namespace:
    return KEYSPACE.namespace("products:{tenantId}", tenantId=tenant)


class Database:
    """The source of truth: one version for all rows; counts loads per key, and can hold
    loads at a gate."""

    def __init__(self) -> None:
        self.version = 0
        self.loads: Counter[str] = Counter()
        self.order: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.in_flight = 0
        self.most_in_flight = 0

    async def load(self, key: CacheKey) -> dict[str, Any]:
        self.loads[key.name] += 1
        self.order.append(key.name)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate.wait()
        finally:
            self.in_flight -= 1
        return {"name": key.name, "version": self.version}


async def eventually(condition: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        await asyncio.sleep(0.005)


async def read_pages(warmer: Warmer, reads_per_page: dict[int, int]) -> None:
    for number, reads in reads_per_page.items():
        for _ in range(reads):
            await warmer.get_or_load(page(number))


@pytest.fixture
async def redis_url(redis_server: RedisServer, redis_client: redis.Redis) -> str:
    """The session's redis-server, flushed for this test."""
    return redis_server.url


async def test_a_bump_is_followed_by_rebuilding_the_most_read_keys_first(store: Store) -> None:
    database = Database()
    cache = Cache(store)
    warmer = Warmer(cache, {PAGE: database.load}, concurrency=1)
    await read_pages(warmer, {3: 2, 1: 6, 4: 1, 2: 4})
    assert database.loads.total() == 4

    database.version = 1
    warming = await warmer.bump_and_warm(products())
    report = await warming
    assert (report.keys, report.loaded, report.failed) == (4, 4, 0)
    assert database.order[4:] == [page(number).name for number in (1, 2, 3, 4)]
    # The readers that come next find the new values in the cache.
    for number in (1, 2, 3, 4):
        assert await warmer.get_or_load(page(number)) == {
            "name": page(number).name,
            "version": 1,
        }
    assert database.loads.total() == 8


async def test_only_the_bumped_namespace_is_warmed_and_top_bounds_it(store: Store) -> None:
    database = Database()
    warmer = Warmer(Cache(store), {PAGE: database.load, USER: database.load}, top=2)
    for tenant in ("t1", "t2"):
        for number in (1, 2, 3):
            for _ in range(number):
                await warmer.get_or_load(page(number, tenant))
    await warmer.get_or_load(USER(tenantId="t1", userId="u1"))
    assert [key.name for key in warmer.popular(products("t2"))] == [
        page(3, "t2").name,
        page(2, "t2").name,
    ]
    loads_before = database.loads.total()

    report = await (await warmer.bump_and_warm(products("t2")))
    assert (report.keys, report.loaded) == (2, 2)
    assert database.loads.total() - loads_before == 2
    assert set(database.order[loads_before:]) == {page(3, "t2").name, page(2, "t2").name}


async def test_warming_on_demand_rebuilds_only_what_the_store_lost(redis_url: str) -> None:
    database = Database()
    cache = Cache(RedisStore.from_url(redis_url))
    warmer = Warmer(cache, {PAGE: database.load, PRODUCT: database.load})
    await read_pages(warmer, {1: 3, 2: 2})
    await warmer.get_or_load(PRODUCT(tenantId="t1", productId="p1"))
    assert (await warmer.warm()).loaded == 0  # everything is cached

    client = redis.Redis.from_url(redis_url)
    await client.flushall()  # as after a Redis restart without persistence
    await client.aclose()
    report = await warmer.warm()
    assert (report.keys, report.loaded) == (3, 3)
    loads = database.loads.total()
    await read_pages(warmer, {1: 1, 2: 1})
    assert database.loads.total() == loads
    await cache.aclose()


async def test_warming_and_concurrent_readers_share_one_load_per_key(store: Store) -> None:
    database = Database()
    cache = Cache(store)
    numbers = range(12)
    warmer = Warmer(cache, {PAGE: database.load}, concurrency=len(numbers))
    await read_pages(warmer, dict.fromkeys(numbers, 1))
    database.loads.clear()
    misses_before = cache.stats.misses

    database.version = 1
    database.gate.clear()
    warming = await warmer.bump_and_warm(products())
    reads = asyncio.gather(
        *(warmer.get_or_load(page(number)) for number in numbers for _ in range(3))
    )
    # Every read and every warming call has missed and waits for the key's one load.
    await eventually(lambda: cache.stats.misses - misses_before == 4 * len(numbers))
    await eventually(lambda: database.in_flight == len(numbers))
    database.gate.set()
    values = await reads
    report = await warming

    assert all(value["version"] == 1 for value in values)
    assert database.loads == Counter({page(number).name: 1 for number in numbers})
    assert report.keys == len(numbers) and report.loaded <= len(numbers)


async def test_after_one_instance_warms_another_reads_from_redis_not_the_database(
    redis_url: str,
) -> None:
    def instance() -> Cache:
        return Cache(
            RedisStore.from_url(redis_url),
            broadcast=RedisBroadcast.from_url(redis_url),
            near=NearCache(ttl=60),
        )

    database = Database()
    first, second = instance(), instance()
    await first.start()
    await second.start()
    warmer = Warmer(first, {PAGE: database.load})
    numbers = range(10)
    await read_pages(warmer, dict.fromkeys(numbers, 2))
    other_loads = Counter[str]()

    async def read_on_second(number: int) -> Any:
        async def load() -> Any:
            other_loads[page(number).name] += 1
            return await database.load(page(number))

        return await second.get_or_load(page(number), load)

    for number in numbers:  # the second instance's near cache holds every page
        assert (await read_on_second(number))["version"] == 0
    assert len(second.near or ()) == len(numbers)

    hits_before = second.stats.hits
    database.version = 1
    report = await (await warmer.bump_and_warm(products()))
    assert report.loaded == len(numbers)
    # The bump's broadcast reaches the second instance and drops its near copies.
    await eventually(lambda: len(second.near or ()) == 0)
    for number in numbers:
        assert (await read_on_second(number))["version"] == 1
    assert other_loads.total() == 0
    assert second.stats.hits - hits_before == len(numbers)
    await first.aclose()
    await second.aclose()


async def test_a_stale_popular_key_is_served_at_once_and_rebuilt_in_the_background() -> None:
    database = Database()
    cache = Cache(MemoryStore())
    warmer = Warmer(cache, {PRODUCT: database.load})
    key = PRODUCT(tenantId="t1", productId="p1")
    await cache.set(key, {"name": key.name, "version": 0}, ttl=0.001)
    await asyncio.sleep(0.01)  # past its TTL, within its stale-while-revalidate window

    database.version = 1
    database.gate.clear()
    assert await warmer.get_or_load(key) == {"name": key.name, "version": 0}
    assert cache.stats.stale_hits == 1
    await eventually(lambda: database.in_flight == 1)  # the refresh, in the background
    database.gate.set()
    await eventually(lambda: cache.stats.fills_stored == 1)
    assert await cache.get(key) == {"name": key.name, "version": 1}
    assert database.loads.total() == 1


async def test_warming_keeps_at_most_concurrency_loads_in_flight(store: Store) -> None:
    database = Database()
    warmer = Warmer(Cache(store), {PAGE: database.load}, concurrency=3)
    await read_pages(warmer, dict.fromkeys(range(10), 1))
    database.gate.clear()
    warming = await warmer.bump_and_warm(products())
    await eventually(lambda: database.in_flight == 3)
    await asyncio.sleep(0.05)  # room for a fourth load to start, if it could
    assert database.in_flight == 3
    database.gate.set()
    assert (await warming).loaded == 10
    assert database.most_in_flight == 3


async def test_a_failing_load_does_not_stop_the_warming(store: Store) -> None:
    database = Database()

    async def load(key: CacheKey) -> Any:
        if key.parts["page"] == "2":
            raise RuntimeError("database timeout")
        return await database.load(key)

    warmer = Warmer(Cache(store), {PAGE: load})
    for number in (1, 3):
        await warmer.get_or_load(page(number))
    with pytest.raises(RuntimeError):
        await warmer.get_or_load(page(2))
    report = await (await warmer.bump_and_warm(products()))
    assert (report.keys, report.loaded, report.failed) == (3, 3, 1)
    assert database.loads.total() == 4


async def test_closing_cancels_a_warming_in_progress() -> None:
    database = Database()
    warmer = Warmer(Cache(MemoryStore()), {PAGE: database.load})
    await read_pages(warmer, {1: 1})
    database.gate.clear()
    warming = await warmer.bump_and_warm(products())
    await eventually(lambda: database.in_flight == 1)
    await warmer.aclose()
    assert warming.cancelled()
    assert database.in_flight == 0


def test_popularity_fades_and_stays_within_capacity() -> None:
    warmer = Warmer(Cache(MemoryStore()), {PAGE: Database().load}, capacity=3, half_life_reads=8)
    for _ in range(6):
        warmer.track(page(1))  # yesterday's favourite
    for number in (2, 3, 4, 5, 6):
        warmer.track(page(number))
    for _ in range(8):
        warmer.track(page(7))  # today's
    ranked = warmer.popular()
    assert len(ranked) <= 3
    assert ranked[0] == page(7)


def test_a_template_without_a_loader_cannot_be_tracked() -> None:
    warmer = Warmer(Cache(MemoryStore()), {PAGE: Database().load})
    with pytest.raises(ValueError, match="no loader for template"):
        warmer.track(USER(tenantId="t1", userId="u1"))


def test_options_are_checked() -> None:
    for option in ("capacity", "top", "concurrency", "half_life_reads"):
        with pytest.raises(ValueError, match=option):
            Warmer(Cache(MemoryStore()), {}, **{option: 0})
