"""Write-behind: writes are cached at once, persisted later, and none is lost when a flusher
is killed or Redis restarts. The basics run on both deployments (MemoryBus + MemoryStore,
RedisStreamBus + RedisStore); the failure tests on private redis-servers."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as redis

from freshcache.cache import Cache
from freshcache.core.keys import CacheKey, KeySpace, commerce_keyspace
from freshcache.pipeline.bus import Bus, MemoryBus, RedisStreamBus, stream_position
from freshcache.stores.memory import MemoryStore
from freshcache.stores.redis import RedisStore
from freshcache.testing import RedisServer
from freshcache.write_behind import (
    DEFAULT_GROUP,
    DEFAULT_TOPIC,
    PendingWrite,
    WriteBehind,
    WriteBehindFlusher,
)

HELPER = Path(__file__).parent / "helpers" / "sqlite_flusher.py"
KEYSPACE = commerce_keyspace()
PRODUCT = KEYSPACE["product:{tenantId}:{productId}"]


def product(number: int) -> CacheKey:
    return PRODUCT(tenantId="shop-1", productId=number)


@dataclass
class ProductTable:
    """The database side: rows by key, replaced only by a write of a later position."""

    rows: dict[str, tuple[tuple[int, int], Any]] = field(default_factory=dict)
    batches: list[list[PendingWrite]] = field(default_factory=list)
    failures_left: int = 0

    async def persist(self, writes: list[PendingWrite]) -> None:
        self.batches.append(writes)
        if self.failures_left:
            self.failures_left -= 1
            raise ConnectionError("database unavailable")
        for write in writes:
            stored = self.rows.get(write.key.name)
            if stored is None or stored[0] < write.position:
                self.rows[write.key.name] = (write.position, write.value)

    def value(self, key: CacheKey) -> Any:
        return self.rows[key.name][1] if key.name in self.rows else None


@dataclass
class Deployment:
    cache: Cache
    bus: Bus

    def writer(self) -> WriteBehind:
        return WriteBehind(self.cache, self.bus, KEYSPACE)

    def flusher(self, table: ProductTable, **options: Any) -> WriteBehindFlusher:
        return WriteBehindFlusher(self.bus, KEYSPACE, table.persist, **options)

    async def pending(self) -> int:
        return await self.bus.pending(DEFAULT_TOPIC, DEFAULT_GROUP)


def connect(server: RedisServer) -> Deployment:
    client = redis.Redis.from_url(server.url, socket_timeout=10)
    return Deployment(Cache(RedisStore.from_url(server.url)), RedisStreamBus(client))


async def close(deployment: Deployment) -> None:
    await deployment.cache.aclose()
    await deployment.bus.close()


async def wait_until_flushed(deployment: Deployment, attempts: int = 600) -> None:
    """Wait (30 s at most) until the flushers have acknowledged every write."""
    for _ in range(attempts):
        if not await deployment.pending():
            return
        await asyncio.sleep(0.05)


@pytest.fixture(params=["memory", "redis"])
async def deployment(request: pytest.FixtureRequest) -> AsyncIterator[Deployment]:
    if request.param == "memory":
        yield Deployment(Cache(MemoryStore()), MemoryBus())
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    connected = connect(server)
    assert isinstance(connected.bus, RedisStreamBus)
    await connected.bus.client.flushall()
    yield connected
    await close(connected)


async def test_a_write_is_cached_at_once_and_persisted_by_the_flusher(
    deployment: Deployment,
) -> None:
    table = ProductTable()
    flusher = deployment.flusher(table)
    await flusher.bus.ensure_group(flusher.topic, flusher.group)

    message_id = await deployment.writer().write(product(1), {"name": "Lamp", "price": 30})

    assert await deployment.cache.get(product(1)) == {"name": "Lamp", "price": 30}
    assert table.rows == {}
    assert await deployment.pending() == 1
    assert await flusher.flush_once() == 1
    assert table.rows == {
        product(1).name: (
            stream_position(message_id),
            {"name": "Lamp", "price": 30},
        )
    }
    assert await deployment.pending() == 0
    assert await flusher.flush_once() == 0


async def test_writes_of_one_key_are_coalesced_into_the_latest(deployment: Deployment) -> None:
    table = ProductTable()
    writer = deployment.writer()
    for price in range(10):
        await writer.write(product(1), {"price": price})
    await writer.write(product(2), {"price": 99})

    assert await deployment.flusher(table).flush_once() == 11

    assert [[(w.key, w.value) for w in batch] for batch in table.batches] == [
        [(product(1), {"price": 9}), (product(2), {"price": 99})]
    ]
    assert await deployment.pending() == 0


async def test_concurrent_writes_of_one_key_leave_cache_and_database_agreeing(
    deployment: Deployment,
) -> None:
    table = ProductTable()
    writer = deployment.writer()
    ids = await asyncio.gather(*(writer.write(product(1), {"n": n}) for n in range(60)))
    last = max(range(60), key=lambda n: stream_position(ids[n]))

    await deployment.flusher(table).flush_once()

    assert await deployment.cache.get(product(1)) == {"n": last}
    assert table.value(product(1)) == {"n": last}


async def test_a_failing_persist_is_retried_and_nothing_acknowledged_before(
    deployment: Deployment,
) -> None:
    table = ProductTable(failures_left=2)
    flusher = deployment.flusher(table)
    writer = deployment.writer()
    for number in range(5):
        await writer.write(product(number), {"price": number})

    for _ in range(2):
        with pytest.raises(ConnectionError):
            await flusher.flush_once()
        assert await deployment.pending() == 5
    await writer.write(product(9), {"price": 9})  # not part of the failed batch
    assert await flusher.flush_once() == 5
    assert await flusher.flush_once() == 1

    assert len(table.batches) == 4
    assert table.batches[0] == table.batches[1] == table.batches[2]
    assert {name: value for name, (_, value) in table.rows.items()} == {
        product(number).name: {"price": number} for number in (0, 1, 2, 3, 4, 9)
    }
    assert await deployment.pending() == 0


async def test_run_backs_off_and_retries_until_persist_succeeds(deployment: Deployment) -> None:
    table = ProductTable(failures_left=3)
    flusher = deployment.flusher(table, block_seconds=0.05, retry_base_seconds=0.01)
    await deployment.writer().write(product(1), {"price": 1})

    await flusher.bus.ensure_group(flusher.topic, flusher.group)
    running = asyncio.create_task(flusher.run())
    await wait_until_flushed(deployment)
    flusher.stop()
    await asyncio.wait_for(running, timeout=10)

    assert await deployment.pending() == 0
    assert flusher.failures == 3
    assert table.value(product(1)) == {"price": 1}


async def test_malformed_messages_are_acknowledged_counted_and_skipped(
    deployment: Deployment,
) -> None:
    table = ProductTable()
    garbage = [
        b"not json",
        b"[1, 2]",
        orjson.dumps({"template": "nope:{x}", "parts": {"x": "1"}, "value": 1}),
        orjson.dumps({"template": PRODUCT.name, "parts": {"productId": "1"}, "value": 1}),
        orjson.dumps({"template": PRODUCT.name, "parts": ["shop-1", "1"], "value": 1}),
        orjson.dumps({"template": PRODUCT.name, "parts": {"tenantId": "a", "productId": "1"}}),
    ]
    for payload in garbage[:3]:
        await deployment.bus.publish(DEFAULT_TOPIC, payload)
    await deployment.writer().write(product(1), {"price": 1})
    for payload in garbage[3:]:
        await deployment.bus.publish(DEFAULT_TOPIC, payload)
    flusher = deployment.flusher(table)

    assert await flusher.flush_once() == 7

    assert flusher.malformed == 6
    assert table.value(product(1)) == {"price": 1}
    assert await deployment.pending() == 0


async def test_a_key_of_another_keyspace_is_refused(deployment: Deployment) -> None:
    other = KeySpace()
    key = other.declare("product:{tenantId}:{productId}")(tenantId="shop-1", productId=1)
    with pytest.raises(ValueError, match="not declared in this keyspace"):
        await deployment.writer().write(key, 1)
    assert await deployment.cache.get(key) is None


# -- failures -----------------------------------------------------------------------------


async def test_a_flusher_recreates_a_group_that_redis_lost(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    deployment = connect(redis_server)
    bus = deployment.bus
    assert isinstance(bus, RedisStreamBus)
    table = ProductTable()
    losses = ["after persisting"]

    async def persist(writes: list[PendingWrite]) -> None:
        await table.persist(writes)
        if losses:
            losses.pop()
            await bus.client.delete(DEFAULT_TOPIC)  # as a restart without persistence would

    try:
        await bus.client.flushall()
        writer = deployment.writer()
        flusher = WriteBehindFlusher(bus, KEYSPACE, persist)
        await writer.write(product(1), {"price": 1})
        assert await flusher.flush_once() == 1  # persisted; the ack finds no group
        await writer.write(product(2), {"price": 2})
        assert await flusher.flush_once() == 1  # the group is recreated before reading
        await bus.client.delete(DEFAULT_TOPIC)
        await writer.write(product(3), {"price": 3})
        assert await flusher.flush_once() == 0  # the read finds no group
        await writer.write(product(4), {"price": 4})
        assert await flusher.flush_once() == 2  # recreated at the stream's start
    finally:
        await close(deployment)

    assert sorted(table.rows) == sorted(product(number).name for number in (1, 2, 3, 4))
    assert sum("vanished" in record.getMessage() for record in caplog.records) == 2


async def start_flusher(
    server: RedisServer, database: Path, consumer: str, *options: str
) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HELPER),
        server.url,
        str(database),
        consumer,
        *options,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    await expect_line(process, "ready")
    return process


async def expect_line(process: asyncio.subprocess.Process, expected: str) -> None:
    assert process.stdout is not None and process.stderr is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
    if line.decode().strip() != expected:
        errors = (await process.stderr.read()).decode(errors="replace")
        raise AssertionError(f"flusher said {line!r} instead of {expected!r}:\n{errors}")


async def end(process: asyncio.subprocess.Process, how: signal.Signals) -> None:
    if process.returncode is None:
        process.send_signal(how)
    await process.communicate()


def persisted_rows(database: Path) -> dict[str, Any]:
    with closing(sqlite3.connect(database, timeout=10)) as connection:
        rows = connection.execute("SELECT key, value FROM writes").fetchall()
    return {key: orjson.loads(value) for key, value in rows}


async def test_a_killed_flusher_loses_no_acknowledged_write(tmp_path: Path) -> None:
    database = tmp_path / "shop.sqlite"
    # 500 writes of 400 keys: keys 0-99 twice. The flusher's batches are then exactly
    # writes 0-24, 25-49, ...: it persists four, hangs in the fifth (writes 100-124, the
    # only writes of their keys, so losing that batch would show) and is killed there.
    writes = [(product(number % 400), {"write": number}) for number in range(500)]
    latest = {key.name: value for key, value in writes}
    with RedisServer() as server:
        deployment = connect(server)
        processes = []
        try:
            writer = deployment.writer()
            for start in range(0, len(writes), 50):
                await asyncio.gather(
                    *(writer.write(key, value) for key, value in writes[start : start + 50])
                )
            first = await start_flusher(
                server, database, "flusher-1", "--persist-delay", "0.02", "--stall-after", "4"
            )
            processes.append(first)
            await expect_line(first, "stalled")
            await end(first, signal.SIGKILL)

            assert len(persisted_rows(database)) == 100
            assert await deployment.pending() == 400

            second = await start_flusher(server, database, "flusher-2", "--claim-idle", "0.3")
            processes.append(second)
            await wait_until_flushed(deployment)
            assert await deployment.pending() == 0
        finally:
            for process in processes:
                await end(process, signal.SIGKILL)
            await close(deployment)

    rows = persisted_rows(database)
    lost = sorted(name for name, value in latest.items() if rows.get(name) != value)
    assert not lost, f"{len(lost)} of {len(latest)} keys lost their last acknowledged write: {lost}"


async def test_a_restarted_redis_loses_no_acknowledged_write() -> None:
    table = ProductTable()
    acknowledged: list[PendingWrite] = []
    server = RedisServer(appendonly=True).start()
    try:
        before = connect(server)
        writer = before.writer()

        async def write(numbers: range) -> None:
            for number in numbers:
                key, value = product(number), {"write": len(acknowledged)}
                acknowledged.append(PendingWrite(key, value, await writer.write(key, value)))

        await write(range(150))
        assert await before.flusher(table, batch_size=50).flush_once() == 50
        # This flusher's batch (the only writes of products 50-99) fails and is still
        # pending when Redis goes down.
        crashing = before.flusher(ProductTable(failures_left=1), consumer="crashing")
        with pytest.raises(ConnectionError):
            await crashing.flush_once()
        await write(range(100, 250))
        await asyncio.sleep(1.5)  # more than one AOF fsync (appendfsync everysec)
        server.kill()
        await close(before)

        server.restart()
        after = connect(server)
        try:
            last_by_key = {write.key.name: write for write in acknowledged}
            cached = await after.cache.get_many([write.key for write in last_by_key.values()])
            assert cached == [write.value for write in last_by_key.values()]

            drain = after.flusher(table, consumer="after", claim_idle_seconds=0.2)
            for _ in range(600):
                if not await after.pending():
                    break
                await drain.flush_once(block_seconds=0.05)
            assert await after.pending() == 0
        finally:
            await close(after)
    finally:
        server.stop()

    lost = [
        write
        for write in acknowledged
        if write.key.name not in table.rows or table.rows[write.key.name][0] < write.position
    ]
    assert not lost, f"{len(lost)} of {len(acknowledged)} acknowledged writes lost"
    assert {name: value for name, (_, value) in table.rows.items()} == {
        name: write.value for name, write in last_by_key.items()
    }
