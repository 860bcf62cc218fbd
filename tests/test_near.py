"""The near cache: served in-process, dropped by broadcasts, cleared when it may have
missed one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence

import pytest
import redis.asyncio as redis

from freshcache.cache import Cache
from freshcache.core.keys import CacheKey, commerce_keyspace
from freshcache.near import MISSING, NearCache
from freshcache.pipeline.broadcast import Broadcast, MemoryBroadcast, MemoryHub, RedisBroadcast
from freshcache.stores.base import Entry, Store
from freshcache.stores.memory import MemoryStore
from freshcache.stores.redis import RedisStore
from freshcache.testing import RedisServer

KEYSPACE = commerce_keyspace()
PRODUCT = KEYSPACE["product:{tenantId}:{productId}"]
PAGE = KEYSPACE["products:{tenantId}:category:{categoryId}:page:{page}"]


def product(product_id: str = "p1") -> CacheKey:
    return PRODUCT(tenantId="t1", productId=product_id)


async def eventually(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        await asyncio.sleep(0.005)


async def constant(value: object) -> object:
    return value


@pytest.fixture(params=["memory", "redis"])
async def instances(
    request: pytest.FixtureRequest, redis_server: RedisServer
) -> AsyncIterator[tuple[Cache, Cache]]:
    """Two instances with near caches sharing one store and one broadcast medium."""
    hub = MemoryHub()
    shared = MemoryStore()

    def make() -> Cache:
        store: Store
        broadcast: Broadcast
        if request.param == "memory":
            store, broadcast = shared, MemoryBroadcast(hub)
        else:
            store = RedisStore.from_url(redis_server.url)
            broadcast = RedisBroadcast.from_url(redis_server.url)
        return Cache(store, broadcast=broadcast, near=NearCache(ttl=60))

    first, second = make(), make()
    if request.param == "redis":
        assert isinstance(first.store, RedisStore)
        await first.store.client.flushdb()
    await first.start()
    await second.start()
    yield first, second
    await first.aclose()
    await second.aclose()


async def test_hits_are_served_in_process(instances: tuple[Cache, Cache]) -> None:
    cache, _ = instances
    assert await cache.get_or_load(product(), lambda: constant({"v": 1})) == {"v": 1}
    await cache.store.delete([product()])  # behind the cache's back: only the near copy left
    assert await cache.get(product()) == {"v": 1}
    assert cache.stats.near_hits == 1


@pytest.mark.parametrize("kind", ["key", "tag", "namespace"])
async def test_an_invalidation_elsewhere_drops_the_near_copy(
    instances: tuple[Cache, Cache], kind: str
) -> None:
    reader, writer = instances
    key = PAGE(tenantId="t1", categoryId="c", page=1) if kind == "namespace" else product()
    assert await reader.get_or_load(key, lambda: constant("old")) == "old"
    assert reader.near is not None and reader.near.lookup(key.physical) == "old"
    if kind == "key":
        await writer.invalidate_keys(key)
    elif kind == "tag":
        await writer.invalidate_tags(*key.tags)
    else:
        assert key.namespace is not None
        await writer.bump_namespace(key.namespace)
    near = reader.near
    await eventually(lambda: near.lookup(key.physical) is MISSING)
    assert await reader.get_or_load(key, lambda: constant("new")) == "new"


async def test_a_set_elsewhere_drops_the_near_copy(instances: tuple[Cache, Cache]) -> None:
    reader, writer = instances
    await reader.get_or_load(product(), lambda: constant(1))
    await writer.set(product(), 2)
    near = reader.near
    assert near is not None
    await eventually(lambda: near.lookup(product().physical) is MISSING)
    assert await reader.get(product()) == 2


class SlowReads(MemoryStore):
    """A memory store whose reads take a while, so a broadcast can land meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = asyncio.Event()
        self.finish_read = asyncio.Event()

    async def read(self, key: CacheKey) -> Entry | None:
        entry = await super().read(key)
        self.reading.set()
        await self.finish_read.wait()
        return entry

    async def read_many(self, keys: Sequence[CacheKey]) -> list[Entry | None]:
        return [await self.read(key) for key in keys]


async def test_a_read_overtaken_by_an_invalidation_is_not_kept() -> None:
    store = SlowReads()
    hub = MemoryHub()
    reader = Cache(store, broadcast=MemoryBroadcast(hub), near=NearCache())
    writer = Cache(MemoryStore(), broadcast=MemoryBroadcast(hub))
    await reader.start()
    await writer.start()
    await store.write([(product(), Entry(b'"old"', time.time() + 60), 60)])
    read = asyncio.create_task(reader.get(product()))
    await store.reading.wait()  # the old value is on its way back
    await writer.invalidate_keys(product())  # applied to another store: only the broadcast
    near = reader.near
    assert near is not None
    await eventually(lambda: near.epoch > 0)
    store.finish_read.set()
    assert await read == "old"  # that read started before the invalidation
    assert near.lookup(product().physical) is MISSING
    await reader.aclose()
    await writer.aclose()


async def test_without_a_subscription_the_near_cache_stays_off() -> None:
    with RedisServer() as server:
        broadcast = RedisBroadcast.from_url(server.url)
        broadcast.reconnect_delay = 0.05
        near = NearCache()
        cache = Cache(
            RedisStore.from_url(server.url), broadcast=broadcast, near=near, retry_after=0.05
        )
        await cache.start()
        assert near.enabled
        await cache.get_or_load(product(), lambda: constant(1))
        assert len(near) == 1

        server.kill()
        await eventually(lambda: not near.enabled)
        assert len(near) == 0 and broadcast.disconnects == 1

        server.start()
        await eventually(lambda: near.enabled, within=10)
        await asyncio.sleep(0.1)  # past the store's fail-open pause
        assert await cache.get_or_load(product(), lambda: constant(2)) == 2
        assert len(near) == 1
        await cache.aclose()


async def test_near_entries_expire_and_are_bounded() -> None:
    near = NearCache(max_entries=2, ttl=0.05, standalone=True)
    for name in ("a", "b", "c"):
        near.keep(product(name), name, time.time() + 60, near.epoch)
    assert len(near) == 2 and near.lookup(product("a").physical) is MISSING
    await asyncio.sleep(0.1)
    assert near.lookup(product("c").physical) is MISSING


def test_an_unreadable_broadcast_clears_everything() -> None:
    near = NearCache(standalone=True)
    near.keep(product(), 1, time.time() + 60, near.epoch)
    near.on_message(b"not json")
    assert len(near) == 0 and near.stats.clears == 1


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_confirmed_invalidation_has_reached_every_near_cache_when_it_returns(
    kind: str, redis_server: RedisServer
) -> None:
    hub, shared = MemoryHub(), MemoryStore()

    def make() -> Cache:
        if kind == "memory":
            return Cache(
                shared, broadcast=MemoryBroadcast(hub), near=NearCache(), confirm_invalidations=5
            )
        return Cache(
            RedisStore.from_url(redis_server.url),
            broadcast=RedisBroadcast.from_url(redis_server.url),
            near=NearCache(),
            confirm_invalidations=5,
        )

    readers = [make() for _ in range(3)]
    writer = make()
    for cache in (*readers, writer):
        await cache.start()
    for reader in readers:
        await reader.get_or_load(product("confirmed"), lambda: constant("old"))
    await writer.set(product("confirmed"), "new")
    # No waiting: every reader dropped its copy before set() returned.
    assert [await reader.get(product("confirmed")) for reader in readers] == ["new"] * 3
    assert writer.stats.unconfirmed_broadcasts == 0
    for cache in (*readers, writer):
        await cache.aclose()


async def test_an_instance_that_does_not_confirm_is_counted(redis_server: RedisServer) -> None:
    silent = redis.Redis.from_url(redis_server.url)
    pubsub = silent.pubsub()
    await pubsub.subscribe("freshcache:invalidations")  # receives, never confirms
    writer = Cache(
        RedisStore.from_url(redis_server.url),
        broadcast=RedisBroadcast.from_url(redis_server.url),
        near=NearCache(),
        confirm_invalidations=0.2,
    )
    await writer.start()
    await writer.invalidate_keys(product("x"))
    assert writer.stats.unconfirmed_broadcasts == 1
    await writer.aclose()
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await silent.aclose()
