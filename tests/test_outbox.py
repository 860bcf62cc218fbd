"""The transactional outbox and its relay, on a private PostgreSQL, on SQLite, and with a
real Redis Streams bus: every committed change becomes an event, none is lost when a
writer, a relay or the bus dies, and a rolled-back change produces nothing."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis.asyncio as redis
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    Table,
    Text,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from freshcache.core.events import Event, new_event, parse_event
from freshcache.pipeline.bus import Bus, GroupNotFound, RedisStreamBus
from freshcache.pipeline.outbox import WatchedTable, enqueue_event, install_outbox, outbox_table
from freshcache.pipeline.relay import OutboxRelay
from freshcache.stores.base import StoreUnavailable
from freshcache.testing import PostgresServer, RedisServer

HELPERS = Path(__file__).parent / "helpers"

products = Table(
    "products",
    MetaData(),
    Column("tenant_id", Text, primary_key=True),
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("category_id", Text),
    Column("stock", Integer, nullable=False),
    Column("name", Text, nullable=False),
)

PRODUCTS = WatchedTable(
    table="products",
    entity="product",
    tenant_column="tenant_id",
    id_columns={"id": "productId"},
    extra_columns={"category_id": "categoryId"},
    value_columns={"stock": "newStock"},
)


def product(tenant: str, product_id: int, stock: int = 5) -> dict[str, object]:
    return {
        "tenant_id": tenant,
        "id": product_id,
        "category_id": "c1",
        "stock": stock,
        "name": f"product {product_id}",
    }


class Observer:
    """Reads a topic through a consumer group of its own and keeps every event seen."""

    def __init__(self, bus: Bus, topic: str) -> None:
        self.bus = bus
        self.topic = topic
        self.events: list[Event] = []

    async def collect(self, at_least: int = 0) -> list[Event]:
        """Everything published so far, waiting up to 10 s for ``at_least`` events in all
        (the caller's assertion then says what is missing)."""
        deadline = time.monotonic() + 10
        while True:
            try:
                messages = await self.bus.read(self.topic, "observer", "test", 1000, 0.05)
            except GroupNotFound:
                # First read, or the server lost the stream and its group.
                await self.bus.ensure_group(self.topic, "observer")
                continue
            except StoreUnavailable:
                # A connection from before a Redis restart fails once, then reconnects.
                assert time.monotonic() < deadline, "the bus stayed unavailable"
                continue
            self.events += [parse_event(message.payload) for message in messages]
            if messages:
                continue
            if len(self.events) >= at_least or time.monotonic() > deadline:
                return self.events


async def relay_all(relay: OutboxRelay) -> int:
    relayed = 0
    while count := await relay.relay_once():
        relayed += count
    return relayed


async def outbox_rows(engine: AsyncEngine) -> list[tuple[str, bool]]:
    """Every outbox row as (eventId, sent?), in id order."""
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(outbox_table.c.payload, outbox_table.c.sent_at).order_by(outbox_table.c.id)
        )
        return [(parse_event(payload).event_id, sent_at is not None) for payload, sent_at in rows]


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


async def fresh_schema(engine: AsyncEngine, *watched: WatchedTable) -> None:
    async with engine.begin() as connection:
        await connection.run_sync(products.metadata.drop_all)
        await connection.run_sync(outbox_table.metadata.drop_all)
        await connection.run_sync(products.metadata.create_all)
    await install_outbox(engine, watched)


@contextlib.asynccontextmanager
async def shop_database(url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on ``url`` with an empty watched ``products`` table and an empty outbox."""
    engine = create_async_engine(url)
    try:
        await fresh_schema(engine, PRODUCTS)
        yield engine
    finally:
        await engine.dispose()


def sqlite_url(folder: Path) -> str:
    return f"sqlite+aiosqlite:///{folder / 'shop.db'}"


@pytest.fixture
async def pg_engine(postgres: PostgresServer) -> AsyncIterator[AsyncEngine]:
    async with shop_database(postgres.url) as engine:
        yield engine


@pytest.fixture
async def sqlite_engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    async with shop_database(sqlite_url(tmp_path)) as engine:
        yield engine


@pytest.fixture(params=["postgresql", "sqlite"])
async def any_engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """Each backend in turn (PostgreSQL's server is started only when needed)."""
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres").url
    else:
        url = sqlite_url(tmp_path)
    async with shop_database(url) as engine:
        yield engine


@pytest.fixture
async def bus(redis_server: RedisServer) -> AsyncIterator[RedisStreamBus]:
    client = redis.Redis.from_url(redis_server.url)
    yield RedisStreamBus(client)
    await client.aclose()


@pytest.fixture
def topic() -> str:
    return f"outbox-test:{uuid.uuid4().hex}"


def assert_product_lifecycle(events: list[Event], tenant: str, product_id: str) -> None:
    """created, updated (stock 4, category c1 -> c2), deleted: one event each."""
    assert [event.event_type for event in events] == [
        "product.created",
        "product.updated",
        "product.deleted",
    ]
    assert {event.tenant_id for event in events} == {tenant}
    assert [event.fields["productId"] for event in events] == [product_id] * 3
    created, updated, deleted = events
    assert created.fields["categoryId"] == "c1"
    assert created.fields["newStock"] == 5
    assert "previousCategoryId" not in created.fields
    assert updated.fields["categoryId"] == "c2"
    assert updated.fields["previousCategoryId"] == "c1"
    assert updated.fields["newStock"] == 4
    assert deleted.fields["categoryId"] == "c2"
    assert len({event.event_id for event in events}) == 3


@pytest.mark.parametrize(
    "changes",
    [
        {"table": "products; DROP TABLE products"},
        {"table": 'products"'},
        {"table": "freshcache_outbox"},
        {"table": "p" * 46},
        {"entity": "Product"},
        {"tenant_column": "tenant id"},
        {"id_columns": {"id) --": "productId"}},
        {"id_columns": {"id": "product-id"}},
        {"extra_columns": {"category_id": "tenantId"}},
        {"extra_columns": {"category_id": "productId"}},
        {"extra_columns": {"category_id": "previousProductId"}},
        {"value_columns": {"stock": "stockId"}},
        {"operations": {"TRUNCATE": "emptied"}},
        {"operations": {"UPDATE": "was updated"}},
        {"operations": {}},
        {"operations": {"INSERT": "created"}, "only_when_changed": ["stock"]},
        {"only_when_changed": ["stock'"]},
    ],
)
def test_declarations_with_unsafe_or_clashing_names_are_refused(
    changes: dict[str, object],
) -> None:
    declaration: dict[str, object] = {
        "table": "products",
        "entity": "product",
        "tenant_column": "tenant_id",
        "id_columns": {"id": "productId"},
        **changes,
    }
    with pytest.raises(ValueError):
        WatchedTable(**declaration)  # type: ignore[arg-type]


async def test_postgres_changes_through_sqlalchemy_become_one_event_each(
    pg_engine: AsyncEngine, bus: RedisStreamBus, topic: str
) -> None:
    # Installing again changes nothing: still one trigger per operation.
    await install_outbox(pg_engine, [PRODUCTS])
    async with pg_engine.begin() as connection:
        await connection.execute(insert(products).values(product("t1", 1)))
    async with pg_engine.begin() as connection:
        await connection.execute(
            update(products).where(products.c.id == 1).values(stock=4, category_id="c2")
        )
    async with pg_engine.begin() as connection:
        await connection.execute(delete(products).where(products.c.id == 1))
    async with pg_engine.connect() as connection:
        await connection.execute(insert(products).values(product("t1", 2)))
        await enqueue_event(connection, new_event("order.created", "t1", orderId="o1"))
        await connection.rollback()
    async with pg_engine.begin() as connection:
        await enqueue_event(connection, new_event("order.shipped", "t1", orderId="o1"))

    relay = OutboxRelay(pg_engine, bus, topic=topic, batch_size=2)
    assert await relay_all(relay) == 4

    events = await Observer(bus, topic).collect()
    assert_product_lifecycle(events[:3], "t1", "1")
    assert events[3].event_type == "order.shipped"
    assert events[3].fields["orderId"] == "o1"
    assert [sent for _, sent in await outbox_rows(pg_engine)] == [True] * 4


async def test_postgres_changes_by_any_writer_become_events(
    postgres: PostgresServer, pg_engine: AsyncEngine, bus: RedisStreamBus, topic: str
) -> None:
    psql = shutil.which("psql")
    assert psql is not None, "psql not found; install it with: apt-get install -y postgresql-client"
    script = """
        INSERT INTO products VALUES ('t2', 7, 'c1', 5, 'lamp');
        UPDATE products SET stock = 4, category_id = 'c2' WHERE id = 7;
        BEGIN;
        INSERT INTO products VALUES ('t2', 8, 'c1', 1, 'never committed');
        UPDATE products SET stock = 0 WHERE id = 7;
        ROLLBACK;
        -- A writer whose search_path lacks the outbox's schema is covered too.
        SET search_path TO pg_catalog;
        DELETE FROM public.products WHERE id = 7;
    """
    written = await asyncio.to_thread(
        subprocess.run,
        [psql, postgres.dsn, "--no-psqlrc", "-v", "ON_ERROR_STOP=1", "-q"],
        input=script.encode(),
        capture_output=True,
    )
    assert written.returncode == 0, written.stderr.decode()

    await relay_all(OutboxRelay(pg_engine, bus, topic=topic))
    assert_product_lifecycle(await Observer(bus, topic).collect(), "t2", "7")


async def test_reinstalling_replaces_the_triggers(
    pg_engine: AsyncEngine, bus: RedisStreamBus, topic: str
) -> None:
    stock_only = WatchedTable(
        table="products",
        entity="product",
        tenant_column="tenant_id",
        id_columns={"id": "productId"},
        value_columns={"stock": "newStock"},
        operations={"UPDATE": "stockChanged"},
        only_when_changed=["stock"],
    )
    await install_outbox(pg_engine, [stock_only])
    async with pg_engine.begin() as connection:
        await connection.execute(insert(products).values(product("t1", 1, stock=5)))
        await connection.execute(update(products).values(name="renamed"))
        await connection.execute(update(products).values(stock=5))
        await connection.execute(update(products).values(stock=3))
        await connection.execute(delete(products))

    await relay_all(OutboxRelay(pg_engine, bus, topic=topic))
    events = await Observer(bus, topic).collect()
    assert [(event.event_type, event.fields["newStock"]) for event in events] == [
        ("product.stockChanged", 3)
    ]


async def test_sqlite_changes_are_relayed_by_polling(
    sqlite_engine: AsyncEngine, tmp_path: Path, bus: RedisStreamBus, topic: str
) -> None:
    relay = OutboxRelay(sqlite_engine, bus, topic=topic, poll_interval=0.05)
    running = asyncio.create_task(relay.run())
    observer = Observer(bus, topic)

    async with sqlite_engine.begin() as connection:
        await connection.execute(insert(products).values(product("t1", 1)))
    async with sqlite_engine.begin() as connection:
        await connection.execute(
            update(products).where(products.c.id == 1).values(stock=4, category_id="c2")
        )
    async with sqlite_engine.connect() as connection:
        await connection.execute(insert(products).values(product("t1", 2)))
        await connection.rollback()
    async with sqlite_engine.begin() as connection:
        await connection.execute(delete(products).where(products.c.id == 1))
    assert_product_lifecycle(await observer.collect(at_least=3), "t1", "1")

    def another_writer() -> None:
        with sqlite3.connect(tmp_path / "shop.db") as database:
            database.execute("INSERT INTO products VALUES ('t3', 9, 'c1', 5, 'chair')")
            database.execute("UPDATE products SET stock = 4, category_id = 'c2' WHERE id = 9")
        with sqlite3.connect(tmp_path / "shop.db") as database:
            database.execute("DELETE FROM products WHERE id = 9")

    await asyncio.to_thread(another_writer)
    events = await observer.collect(at_least=6)
    relay.stop()
    await running
    assert_product_lifecycle(events[3:], "t3", "9")
    assert [sent for _, sent in await outbox_rows(sqlite_engine)] == [True] * 6


async def test_sent_rows_are_purged_after_the_retention(
    any_engine: AsyncEngine, bus: RedisStreamBus, topic: str
) -> None:
    engine = any_engine
    async with engine.begin() as connection:
        await connection.execute(insert(products).values([product("t1", i) for i in (1, 2, 3)]))
    await relay_all(OutboxRelay(engine, bus, topic=topic))
    async with engine.begin() as connection:
        await connection.execute(insert(products).values(product("t1", 4)))

    assert await OutboxRelay(engine, bus, topic=topic).purge_sent() == 0
    assert await OutboxRelay(engine, bus, topic=topic, retention=timedelta(0)).purge_sent() == 3
    assert [sent for _, sent in await outbox_rows(engine)] == [False]


async def listening_backend(engine: AsyncEngine, not_pid: int | None = None) -> int:
    """The pid of the backend a relay LISTENs on (waiting up to 10 s for one)."""
    deadline = time.monotonic() + 10
    while True:
        async with engine.connect() as connection:
            pids = list(
                await connection.scalars(
                    text("SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN%'")
                )
            )
        found = [pid for pid in pids if pid != not_pid]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, f"expected one listening backend, found {found}"
            return int(found[0])
        await asyncio.sleep(0.05)


async def test_a_notification_wakes_the_relay_long_before_its_poll_interval(
    pg_engine: AsyncEngine, bus: RedisStreamBus, topic: str
) -> None:
    relay = OutboxRelay(pg_engine, bus, topic=topic, poll_interval=30, retry_base_seconds=0.05)
    running = asyncio.create_task(relay.run())
    observer = Observer(bus, topic)
    try:
        listener = await listening_backend(pg_engine)
        async with pg_engine.begin() as connection:
            await connection.execute(insert(products).values(product("t1", 1)))
        assert len(await observer.collect(at_least=1)) == 1

        # The listening connection drops: the relay listens again on a new one.
        async with pg_engine.connect() as connection:
            await connection.scalar(select(func.pg_terminate_backend(listener)))
        await listening_backend(pg_engine, not_pid=listener)
        async with pg_engine.begin() as connection:
            await connection.execute(insert(products).values(product("t1", 2)))
        events = await observer.collect(at_least=2)
    finally:
        relay.stop()
        await running
    assert [event.fields["productId"] for event in events] == ["1", "2"]


async def run_helper(*arguments: str) -> int:
    process = await asyncio.create_subprocess_exec(sys.executable, *arguments)
    return await process.wait()


async def test_a_writer_killed_right_after_its_commit_loses_no_event(
    postgres: PostgresServer, pg_engine: AsyncEngine, bus: RedisStreamBus, topic: str
) -> None:
    async with pg_engine.begin() as connection:
        await connection.execute(insert(products).values(product("t1", 1, stock=0)))
    updates = 20
    returncode = await run_helper(
        str(HELPERS / "outbox_writer.py"), postgres.url, "t1", "1", str(updates)
    )
    assert returncode == -signal.SIGKILL

    await relay_all(OutboxRelay(pg_engine, bus, topic=topic))
    events = await Observer(bus, topic).collect()
    assert [event.event_type for event in events] == ["product.created"] + [
        "product.updated"
    ] * updates
    assert [event.fields["newStock"] for event in events[1:]] == list(range(1, updates + 1))


async def test_a_relay_killed_before_marking_its_batch_sent_loses_nothing(
    postgres: PostgresServer,
    redis_server: RedisServer,
    pg_engine: AsyncEngine,
    bus: RedisStreamBus,
    topic: str,
) -> None:
    async with pg_engine.begin() as connection:
        await connection.execute(insert(products).values([product("t1", i) for i in range(10)]))
    batch_size = 4
    returncode = await run_helper(
        str(HELPERS / "outbox_relay.py"),
        postgres.url,
        redis_server.url,
        topic,
        str(batch_size),
        f"--kill-after-publishes={batch_size}",
    )
    assert returncode == -signal.SIGKILL
    assert [sent for _, sent in await outbox_rows(pg_engine)] == [False] * 10

    await relay_all(OutboxRelay(pg_engine, bus, topic=topic, batch_size=batch_size))
    events = await Observer(bus, topic).collect()
    deliveries = Counter(event.event_id for event in events)
    rows = await outbox_rows(pg_engine)
    assert set(deliveries) == {event_id for event_id, _ in rows}
    assert all(sent for _, sent in rows)
    # The killed relay's batch went out twice, the rest once.
    assert sorted(deliveries.values()) == [1] * 6 + [2] * batch_size


async def test_concurrent_relays_send_each_row_once(
    postgres: PostgresServer, pg_engine: AsyncEngine, bus: RedisStreamBus, topic: str
) -> None:
    async with pg_engine.begin() as connection:
        await connection.execute(insert(products).values([product("t1", i) for i in range(200)]))
    other_engine = create_async_engine(postgres.url)
    # Connected beforehand, so that neither relay is busy connecting while the other works.
    async with other_engine.connect():
        pass
    relays = [
        OutboxRelay(engine, bus, topic=topic, batch_size=10) for engine in (pg_engine, other_engine)
    ]
    try:
        await asyncio.gather(*(relay_all(relay) for relay in relays))
    finally:
        await other_engine.dispose()

    events = await Observer(bus, topic).collect()
    assert len(events) == 200
    assert {event.event_id for event in events} == {
        event_id for event_id, _ in await outbox_rows(pg_engine)
    }
    # Both took part: a relay skips the rows another one holds.
    assert all(relay.relayed > 0 for relay in relays)
    assert sum(relay.relayed for relay in relays) == 200


async def wait_for_failure(relay: OutboxRelay) -> None:
    deadline = time.monotonic() + 10
    while relay.failures == 0:
        assert time.monotonic() < deadline, "the relay never tried the dead bus"
        await asyncio.sleep(0.05)


async def test_events_written_while_the_bus_is_down_arrive_once_it_is_back(
    pg_engine: AsyncEngine, topic: str
) -> None:
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        bus = RedisStreamBus(client)
        relay = OutboxRelay(
            pg_engine,
            bus,
            topic=topic,
            poll_interval=0.05,
            retry_base_seconds=0.05,
            retry_max_seconds=0.5,
        )
        running = asyncio.create_task(relay.run())
        try:
            async with pg_engine.begin() as connection:
                await connection.execute(
                    insert(products).values([product("t1", i) for i in range(5)])
                )
            before = list(await Observer(bus, topic).collect(at_least=5))

            server.kill()
            async with pg_engine.begin() as connection:
                await connection.execute(
                    insert(products).values([product("t1", i) for i in range(5, 10)])
                )
            await wait_for_failure(relay)
            assert [sent for _, sent in await outbox_rows(pg_engine)] == [True] * 5 + [False] * 5

            server.restart()
            # Without persistence the restarted Redis lost the first five; the relay
            # does not resend what was accepted, so five are expected here.
            after = await Observer(bus, topic).collect(at_least=5)
        finally:
            relay.stop()
            await running
            await client.aclose()

    rows = await outbox_rows(pg_engine)
    assert {event.event_id for event in before + after} == {event_id for event_id, _ in rows}
    assert all(sent for _, sent in rows)
