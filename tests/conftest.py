"""Shared fixtures: one private redis-server per test session, and a ``store`` fixture that
runs a test against every Store backend (the conformance parametrization)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as redis

from freshcache.stores.base import Store
from freshcache.stores.memory import MemoryStore
from freshcache.stores.redis import RedisStore
from freshcache.testing import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, redis_server: RedisServer) -> AsyncIterator[Store]:
    backend: Store
    if request.param == "memory":
        backend = MemoryStore()
    else:
        backend = RedisStore.from_url(redis_server.url)
        assert isinstance(backend, RedisStore)
        await backend.client.flushdb()
    yield backend
    await backend.close()
