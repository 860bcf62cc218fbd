"""One conformance suite for every Bus: the in-process MemoryBus and RedisStreamBus on the
session's private redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from freshcache.pipeline.bus import (
    Bus,
    GroupNotFound,
    MemoryBus,
    RedisStreamBus,
    stream_position,
)
from freshcache.stores.base import StoreUnavailable
from freshcache.testing import RedisServer

TOPIC = "orders:changes"


def bus_client(server: RedisServer) -> redis.Redis:
    """A client that reports a dead server at once (no retries) and outwaits blocked reads."""
    return redis.Redis.from_url(
        server.url, socket_timeout=10, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
    )


@pytest.fixture(params=["memory", "redis"])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    if request.param == "memory":
        yield MemoryBus()
        return
    # The session's private redis-server (conftest), started only if a Redis test runs.
    server: RedisServer = request.getfixturevalue("redis_server")
    client = bus_client(server)
    await client.flushall()
    bus = RedisStreamBus(client)
    yield bus
    await bus.close()


async def retained(bus: Bus, topic: str) -> int:
    """How many messages the backend still stores for ``topic``."""
    if isinstance(bus, MemoryBus):
        return bus.retained(topic)
    assert isinstance(bus, RedisStreamBus)
    return int(await bus.client.xlen(topic))


async def publish_many(bus: Bus, count: int, topic: str = TOPIC) -> list[str]:
    return [await bus.publish(topic, f"m{number}".encode()) for number in range(count)]


async def test_implements_the_protocol(bus: Bus) -> None:
    assert isinstance(bus, Bus)


async def test_read_hands_out_new_messages_in_order_once(bus: Bus) -> None:
    await bus.ensure_group(TOPIC, "flushers")
    ids = await publish_many(bus, 5)
    assert sorted(ids, key=stream_position) == ids and len(set(ids)) == 5

    first = await bus.read(TOPIC, "flushers", "a", 3, 0)
    second = await bus.read(TOPIC, "flushers", "a", 10, 0)
    third = await bus.read(TOPIC, "flushers", "a", 10, 0)

    assert [message.id for message in first + second] == ids
    assert [message.payload for message in first + second] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert {(message.topic, message.deliveries) for message in first + second} == {(TOPIC, 1)}
    assert third == []


async def test_consumers_share_a_group_and_every_group_gets_everything(bus: Bus) -> None:
    for group in ("flushers", "auditors"):
        await bus.ensure_group(TOPIC, group)
    ids = await publish_many(bus, 6)

    to_a = await bus.read(TOPIC, "flushers", "a", 4, 0)
    to_b = await bus.read(TOPIC, "flushers", "b", 4, 0)
    to_auditor = await bus.read(TOPIC, "auditors", "a", 10, 0)

    assert [message.id for message in to_a] == ids[:4]
    assert [message.id for message in to_b] == ids[4:]
    assert [message.id for message in to_auditor] == ids


async def test_a_new_group_starts_at_the_oldest_message_and_creation_is_idempotent(
    bus: Bus,
) -> None:
    ids = await publish_many(bus, 3)
    await bus.ensure_group(TOPIC, "flushers")
    assert len(await bus.read(TOPIC, "flushers", "a", 2, 0)) == 2

    await bus.ensure_group(TOPIC, "flushers")  # must not rewind the group

    assert [message.id for message in await bus.read(TOPIC, "flushers", "a", 10, 0)] == ids[2:]


async def test_pending_counts_undelivered_and_unacknowledged(bus: Bus) -> None:
    await bus.ensure_group(TOPIC, "flushers")
    assert await bus.pending(TOPIC, "flushers") == 0
    await publish_many(bus, 5)
    assert await bus.pending(TOPIC, "flushers") == 5

    taken = await bus.read(TOPIC, "flushers", "a", 3, 0)
    assert await bus.pending(TOPIC, "flushers") == 5

    assert await bus.ack(TOPIC, "flushers", [taken[0].id, taken[1].id]) == 2
    assert await bus.pending(TOPIC, "flushers") == 3
    assert await bus.ack(TOPIC, "flushers", [taken[0].id]) == 0
    assert await bus.ack(TOPIC, "flushers", []) == 0
    assert await bus.pending(TOPIC, "flushers") == 3


async def test_claim_stale_takes_over_idle_messages_and_counts_deliveries(bus: Bus) -> None:
    await bus.ensure_group(TOPIC, "flushers")
    ids = await publish_many(bus, 4)
    taken = await bus.read(TOPIC, "flushers", "dead", 4, 0)
    await bus.ack(TOPIC, "flushers", [taken[1].id])

    assert await bus.claim_stale(TOPIC, "flushers", "heir", 60.0, 10) == []

    await asyncio.sleep(0.15)
    one = await bus.claim_stale(TOPIC, "flushers", "heir", 0.1, 1)
    rest = await bus.claim_stale(TOPIC, "flushers", "heir", 0.1, 10)

    assert [message.id for message in one + rest] == [ids[0], ids[2], ids[3]]
    assert [message.payload for message in one + rest] == [b"m0", b"m2", b"m3"]
    assert [message.deliveries for message in one + rest] == [2, 2, 2]
    # Just claimed, so no longer idle: the heir keeps them.
    assert await bus.claim_stale(TOPIC, "flushers", "other", 0.1, 10) == []

    await asyncio.sleep(0.15)
    again = await bus.claim_stale(TOPIC, "flushers", "third", 0.1, 10)
    assert [message.deliveries for message in again] == [3, 3, 3]

    assert await bus.ack(TOPIC, "flushers", [message.id for message in again]) == 3
    assert await bus.pending(TOPIC, "flushers") == 0
    await asyncio.sleep(0.15)
    assert await bus.claim_stale(TOPIC, "flushers", "heir", 0.1, 10) == []


async def test_claimed_messages_precede_new_ones(bus: Bus) -> None:
    await bus.ensure_group(TOPIC, "flushers")
    await publish_many(bus, 2)
    await bus.read(TOPIC, "flushers", "dead", 2, 0)
    await publish_many(bus, 2)

    claimed = await bus.claim_stale(TOPIC, "flushers", "heir", 0.0, 10)
    new = await bus.read(TOPIC, "flushers", "heir", 10, 0)

    positions = [stream_position(message.id) for message in claimed + new]
    assert len(positions) == 4
    assert positions == sorted(positions)


async def test_a_blocked_read_wakes_up_on_publish(bus: Bus) -> None:
    await bus.ensure_group(TOPIC, "flushers")
    reader = asyncio.create_task(bus.read(TOPIC, "flushers", "a", 10, 8.0))
    await asyncio.sleep(0.1)

    message_id = await bus.publish(TOPIC, b"late")

    messages = await reader
    assert [(message.id, message.payload) for message in messages] == [(message_id, b"late")]


async def test_a_blocked_read_returns_nothing_when_nothing_arrives(bus: Bus) -> None:
    await bus.ensure_group(TOPIC, "flushers")
    assert await bus.read(TOPIC, "flushers", "a", 10, 0.1) == []


async def test_an_unknown_group_is_reported(bus: Bus) -> None:
    await bus.ensure_group(TOPIC, "flushers")
    for topic, group in ((TOPIC, "nobody"), ("no-such-topic", "flushers")):
        with pytest.raises(GroupNotFound):
            await bus.read(topic, group, "a", 1, 0)
        with pytest.raises(GroupNotFound):
            await bus.claim_stale(topic, group, "a", 0.0, 1)
        with pytest.raises(GroupNotFound):
            await bus.ack(topic, group, ["1-0"])
        with pytest.raises(GroupNotFound):
            await bus.pending(topic, group)


async def test_trimming_keeps_what_any_group_has_not_acknowledged(bus: Bus) -> None:
    for group in ("flushers", "auditors"):
        await bus.ensure_group(TOPIC, group)
    await publish_many(bus, 300)
    taken = await bus.read(TOPIC, "flushers", "a", 300, 0)
    kept_back = taken[10]
    await bus.ack(TOPIC, "flushers", [m.id for m in taken if m is not kept_back])

    # The auditors have read nothing yet: every message must still be there for them.
    assert await retained(bus, TOPIC) == 300
    audited = await bus.read(TOPIC, "auditors", "a", 300, 0)
    assert [message.payload for message in audited] == [f"m{n}".encode() for n in range(300)]
    await bus.ack(TOPIC, "auditors", [message.id for message in audited])

    # The flushers still owe one message: it survives the trimming, payload and all.
    reclaimed = await bus.claim_stale(TOPIC, "flushers", "b", 0.0, 10)
    assert [(m.id, m.payload) for m in reclaimed] == [(kept_back.id, b"m10")]

    await bus.ack(TOPIC, "flushers", [kept_back.id])
    assert await retained(bus, TOPIC) < 300
    assert await bus.pending(TOPIC, "flushers") == await bus.pending(TOPIC, "auditors") == 0
    later = await bus.publish(TOPIC, b"later")
    assert [m.id for m in await bus.read(TOPIC, "auditors", "a", 10, 0)] == [later]


# -- Redis specifics --------------------------------------------------------------------


async def test_redis_pending_counts_when_entries_were_deleted(
    redis_server: RedisServer,
) -> None:
    # XDEL makes Redis unable to report a group's lag; pending must count it anyway.
    bus = RedisStreamBus(bus_client(redis_server))
    await bus.client.flushall()
    await bus.ensure_group(TOPIC, "flushers")
    ids = await publish_many(bus, 6)
    await bus.read(TOPIC, "flushers", "a", 1, 0)
    await bus.client.xdel(TOPIC, ids[3])

    assert await bus.pending(TOPIC, "flushers") == 1 + 4
    await bus.close()


async def test_redis_claim_reports_pending_entries_deleted_from_the_stream(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    bus = RedisStreamBus(bus_client(redis_server))
    await bus.client.flushall()
    await bus.ensure_group(TOPIC, "flushers")
    ids = await publish_many(bus, 3)
    await bus.read(TOPIC, "flushers", "dead", 3, 0)
    await bus.client.xdel(TOPIC, ids[1])

    claimed = await bus.claim_stale(TOPIC, "flushers", "heir", 0.0, 10)

    assert [message.id for message in claimed] == [ids[0], ids[2]]
    assert await bus.pending(TOPIC, "flushers") == 2
    assert [record.levelname for record in caplog.records] == ["ERROR"]
    assert ids[1] in caplog.records[0].getMessage()
    await bus.close()


async def test_redis_connection_errors_are_store_unavailable() -> None:
    with RedisServer() as server:
        bus = RedisStreamBus(bus_client(server))
        await bus.ensure_group(TOPIC, "flushers")
        server.kill()
        with pytest.raises(StoreUnavailable):
            await bus.publish(TOPIC, b"lost")
        with pytest.raises(StoreUnavailable):
            await bus.read(TOPIC, "flushers", "a", 1, 0)
        with pytest.raises(StoreUnavailable):
            await bus.claim_stale(TOPIC, "flushers", "a", 0.0, 1)
        await bus.close()
