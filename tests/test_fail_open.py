"""When Redis goes away, reads fail open (the loader answers) and recover by themselves."""

from __future__ import annotations

import asyncio
import time

import pytest

from freshcache.cache import Cache
from freshcache.core.keys import commerce_keyspace
from freshcache.stores.base import StoreUnavailable
from freshcache.stores.redis import RedisStore
from freshcache.testing import RedisServer

PRODUCT = commerce_keyspace()["product:{tenantId}:{productId}"]


async def test_reads_fail_open_while_redis_is_down_and_recover() -> None:
    key = PRODUCT(tenantId="t1", productId="p1")
    loads = 0

    async def load() -> int:
        nonlocal loads
        loads += 1
        return loads

    with RedisServer() as server:
        cache = Cache(RedisStore.from_url(server.url, timeout=0.5), retry_after=0.2)
        assert await cache.get_or_load(key, load) == 1
        assert await cache.get_or_load(key, load) == 1  # cached

        server.kill()
        started = time.monotonic()
        assert await cache.get_or_load(key, load) == 2  # the loader answers
        assert await cache.get_or_load(key, load) == 3  # and keeps answering
        assert await cache.get(key, default="miss") == "miss"
        assert time.monotonic() - started < 5
        assert cache.stats.errors >= 1
        with pytest.raises(StoreUnavailable):
            await cache.invalidate_keys(key)  # an invalidation is never silently lost

        server.start()  # same port, empty (no persistence)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            await cache.get_or_load(key, load)
            loads_before = loads
            if await cache.get_or_load(key, load) and loads == loads_before:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the cache did not use Redis again after it came back")
        await cache.aclose()
