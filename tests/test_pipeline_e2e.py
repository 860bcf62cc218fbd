"""The whole change pipeline with real servers: a row changed by any writer reaches the
shared store and every instance's near cache; a Redis crash in the middle loses nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, Text, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from freshcache.cache import Cache
from freshcache.core.keys import CacheKey, commerce_keyspace
from freshcache.core.rules import MARKETPLACE_RULES, RuleSet
from freshcache.near import MISSING, NearCache
from freshcache.pipeline.broadcast import RedisBroadcast
from freshcache.pipeline.bus import EVENTS_TOPIC, RedisStreamBus
from freshcache.pipeline.outbox import WatchedTable, install_outbox, outbox_table
from freshcache.pipeline.relay import OutboxRelay
from freshcache.pipeline.worker import InvalidationWorker
from freshcache.stores.redis import RedisStore
from freshcache.testing import PostgresServer, RedisServer

KEYSPACE = commerce_keyspace()
PRODUCT = KEYSPACE["product:{tenantId}:{productId}"]
RULES = RuleSet.from_yaml(MARKETPLACE_RULES.read_text(), KEYSPACE)
products = Table(
    "products",
    MetaData(),
    Column("tenant_id", Text, primary_key=True),
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("name", Text, nullable=False),
)
WATCHED = WatchedTable(
    table="products", entity="product", tenant_column="tenant_id", id_columns={"id": "productId"}
)
ROWS = 60


def key(product_id: int) -> CacheKey:
    return PRODUCT(tenantId="t1", productId=product_id)


async def eventually(condition: Callable[[], object], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail("the pipeline did not get there in time")
        await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


class Deployment:
    """A database, the relay and a worker, and two instances with near caches."""

    def __init__(self, engine: AsyncEngine, redis: RedisServer) -> None:
        self.engine = engine
        self.redis = redis
        self.bus = RedisStreamBus(RedisStore.from_url(redis.url).client)
        self.worker_cache = Cache(
            RedisStore.from_url(redis.url), broadcast=RedisBroadcast.from_url(redis.url)
        )
        self.instances = [
            Cache(
                RedisStore.from_url(redis.url),
                broadcast=RedisBroadcast.from_url(redis.url, reconnect_delay=0.05),
                near=NearCache(ttl=60),
                retry_after=0.05,
            )
            for _ in range(2)
        ]
        self.relay = OutboxRelay(engine, self.bus, poll_interval=0.2, retry_max_seconds=0.2)
        self.worker = InvalidationWorker(
            self.bus, RULES, self.worker_cache, retry_delay=0.05, max_retry_delay=0.2
        )

    async def fill(self, product_id: int) -> None:
        for instance in self.instances:
            await instance.get_or_load(key(product_id), lambda: _value(product_id))

    def near_has(self, product_id: int) -> list[bool]:
        return [
            instance.near is not None
            and instance.near.lookup(key(product_id).physical) is not MISSING
            for instance in self.instances
        ]

    async def stored(self, product_id: int) -> bool:
        return await self.worker_cache.store.read(key(product_id)) is not None


async def _value(product_id: int) -> dict[str, object]:
    return {"id": product_id, "name": f"product {product_id}"}


@pytest.fixture
async def deployment(postgres: PostgresServer) -> AsyncIterator[Deployment]:
    engine = create_async_engine(postgres.url)
    async with engine.begin() as connection:
        await connection.run_sync(products.metadata.drop_all)
        await connection.run_sync(outbox_table.metadata.drop_all)
        await connection.run_sync(products.metadata.create_all)
        await connection.execute(
            insert(products), [{"tenant_id": "t1", "id": n, "name": "old"} for n in range(ROWS)]
        )
    await install_outbox(engine, [WATCHED])
    # fsync on every write: the bus is then as durable as the database (DESIGN.md).
    with RedisServer(appendonly=True, extra_args=("--appendfsync", "always")) as redis:
        setup = Deployment(engine, redis)
        async with AsyncExitStack() as stack:
            for cache in (setup.worker_cache, *setup.instances):
                await stack.enter_async_context(cache)
            tasks = [
                asyncio.create_task(setup.relay.run()),
                asyncio.create_task(setup.worker.run()),
            ]
            yield setup
            setup.relay.stop()
            setup.worker.stop()
            # Each finishes the pass in progress; a relay or worker that ignores stop()
            # fails here instead of hanging the suite.
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
            await setup.bus.close()
    await engine.dispose()


async def test_a_row_changed_by_any_writer_leaves_every_layer(deployment: Deployment) -> None:
    for product_id in (1, 2, 3):
        await deployment.fill(product_id)
    assert deployment.near_has(2) == [True, True]
    other_writer = create_async_engine(deployment.engine.url)
    async with other_writer.begin() as connection:
        await connection.execute(text("UPDATE products SET name = 'new' WHERE id = 2"))
    await other_writer.dispose()
    await eventually(lambda: deployment.near_has(2) == [False, False])
    assert not await deployment.stored(2)
    assert deployment.near_has(1) == [True, True] and await deployment.stored(3)


async def test_a_redis_crash_while_events_flow_loses_nothing(deployment: Deployment) -> None:
    for product_id in range(ROWS):
        await deployment.fill(product_id)

    async def write_all() -> None:
        for product_id in range(ROWS):
            async with deployment.engine.begin() as connection:
                await connection.execute(
                    text("UPDATE products SET name = 'new' WHERE id = :id"), {"id": product_id}
                )
            if product_id == ROWS // 3:
                deployment.redis.kill()
            if product_id == ROWS // 2:
                deployment.redis.start()
            await asyncio.sleep(0.01)

    await write_all()

    async def everything_applied() -> bool:
        async with deployment.engine.connect() as connection:
            unsent = await connection.scalar(
                select(func.count())
                .select_from(outbox_table)
                .where(outbox_table.c.sent_at.is_(None))
            )
        if unsent:
            return False
        if await deployment.bus.pending(EVENTS_TOPIC, deployment.worker.group):
            return False
        return not any([await deployment.stored(n) for n in range(ROWS)])

    await eventually(everything_applied)
    for instance in deployment.instances:
        assert instance.broadcast is not None and instance.broadcast.disconnects >= 1
        assert instance.near is not None and instance.near.stats.clears >= 1
    # Nothing a near cache holds now predates the crash: it was cleared when its
    # subscription dropped, and every update since was broadcast.
    assert not any(any(deployment.near_has(n)) for n in range(ROWS))
