"""Room histories (memory and Redis, one suite) and delivery inside an instance: offsets,
replay, trimming, lost histories; joins without gaps or duplicates, slow sinks. Also the
package's exported names."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as redis

import freshcache.realtime
from freshcache.pipeline.broadcast import Broadcast
from freshcache.realtime.fanout import Fanout, LocalRoom, Member, RealtimeStats, RoomDelivery
from freshcache.realtime.history import (
    MemoryHistory,
    RedisHistory,
    RoomHistory,
    RoomMessage,
    decode_message,
    offset_position,
)
from freshcache.testing import RedisServer


@pytest.fixture(params=["memory", "redis"])
async def history(
    request: pytest.FixtureRequest, redis_server: RedisServer
) -> AsyncIterator[RoomHistory]:
    backend: RoomHistory
    if request.param == "memory":
        backend = MemoryHistory(max_messages=50)
    else:
        client = redis.Redis.from_url(redis_server.url)
        await client.flushdb()
        await client.aclose()
        backend = RedisHistory(redis_server.url, max_messages=50)
    yield backend
    await backend.close()


class Received:
    """A subscriber that keeps what the fan-out brought."""

    def __init__(self) -> None:
        self.messages: list[RoomMessage] = []
        self.arrived = asyncio.Event()

    def on_message(self, payload: bytes) -> None:
        self.messages.append(decode_message(payload))
        self.arrived.set()

    def on_connected(self) -> None:
        pass

    def on_disconnected(self) -> None:
        pass

    async def wait_for(self, count: int) -> list[RoomMessage]:
        async with asyncio.timeout(10):
            while len(self.messages) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.messages


async def test_offsets_grow_and_every_instance_receives_messages_in_order(
    history: RoomHistory,
) -> None:
    subscribers: list[tuple[Broadcast, Received]] = []
    for _ in range(2):
        subscription, received = history.subscriber(), Received()
        subscription.add_listener(received)
        await subscription.start()
        subscribers.append((subscription, received))
    appended = [
        await history.append("t:a:product:1", "stockUpdate", f'{{"n":{n}}}') for n in range(20)
    ]
    positions = [message.position for message in appended]
    assert positions == sorted(set(positions))
    for subscription, received in subscribers:
        assert await received.wait_for(20) == appended
        await subscription.stop()


async def test_replay_returns_exactly_the_messages_after_an_offset(history: RoomHistory) -> None:
    room = "t:a:product:2"
    appended = [await history.append(room, "stockUpdate", f'{{"n":{n}}}') for n in range(10)]
    await history.append("t:a:product:3", "stockUpdate", "{}")  # another room's: not replayed
    replay = await history.replay(room, appended[3].offset)
    assert replay.recovered
    assert replay.messages == tuple(appended[4:])
    up_to_date = await history.replay(room, appended[-1].offset)
    assert up_to_date.recovered and up_to_date.messages == ()
    assert await history.position(room) == appended[-1].offset


async def test_an_offset_the_history_no_longer_reaches_is_not_recovered(
    history: RoomHistory,
) -> None:
    room = "t:a:product:4"
    appended = [await history.append(room, "stockUpdate", f'{{"n":{n}}}') for n in range(400)]
    oldest = await history.replay(room, appended[0].offset)
    assert not oldest.recovered and oldest.messages == ()
    recent = await history.replay(room, appended[-6].offset)
    assert recent.recovered and recent.messages == tuple(appended[-5:])


async def test_a_position_taken_before_any_message_never_hides_one(history: RoomHistory) -> None:
    room = "t:a:product:5"
    position = await history.position(room)
    appended = [await history.append(room, "stockUpdate", f'{{"n":{n}}}') for n in range(3)]
    assert all(message.position > offset_position(position) for message in appended)
    replay = await history.replay(room, position)
    # Either every message since, or a plain "not recovered" (then a snapshot is sent).
    assert replay.messages == (tuple(appended) if replay.recovered else ())


async def test_a_lost_history_recovers_nothing(redis_server: RedisServer) -> None:
    first = MemoryHistory()
    offset = (await first.append("t:a:product:6", "stockUpdate", "{}")).offset
    assert not (await MemoryHistory().replay("t:a:product:6", offset)).recovered

    history = RedisHistory(redis_server.url)
    client = redis.Redis.from_url(redis_server.url)
    try:
        offset = (await history.append("t:a:product:6", "stockUpdate", "{}")).offset
        await client.flushdb()  # as a restart without persistence
        assert not (await history.replay("t:a:product:6", offset)).recovered
        await history.append("t:a:product:6", "stockUpdate", "{}")
        assert not (await history.replay("t:a:product:6", offset)).recovered
    finally:
        await client.aclose()
        await history.close()


async def test_memory_history_evicts_whole_rooms_without_losing_track() -> None:
    history = MemoryHistory(max_rooms=2)
    first = await history.append("t:a:product:1", "stockUpdate", "{}")
    await history.append("t:a:product:1", "stockUpdate", "{}")
    second = await history.append("t:a:product:2", "stockUpdate", "{}")
    third = await history.append("t:a:product:3", "stockUpdate", "{}")  # product:1 evicted
    assert not (await history.replay("t:a:product:1", first.offset)).recovered
    # Any room may have been evicted before: only offsets after the last eviction count.
    assert not (await history.replay("t:a:product:3", first.offset)).recovered
    assert (await history.replay("t:a:product:3", second.offset)).messages == (third,)


# -- delivery inside an instance --------------------------------------------------------


class ListSink:
    """A sink that keeps its frames (the encoded offsets), bounded like a real queue."""

    def __init__(self, limit: int = 1000) -> None:
        self.frames: list[str] = []
        self.limit = limit

    def put(self, frame: str) -> bool:
        if len(self.frames) >= self.limit:
            return False
        self.frames.append(frame)
        return True

    def push(self, frame: str) -> None:
        self.frames.append(frame)


def offsets_delivery(evicted: list[Member[Any]]) -> RoomDelivery[str]:
    async def no_resync(room: LocalRoom[str], position: str) -> None:
        raise AssertionError("the history covers the gap: no snapshot needed")

    return RoomDelivery(lambda message: message.offset, no_resync, evicted.append, "test")


async def test_a_join_during_publishing_gets_every_message_once_in_order() -> None:
    history = MemoryHistory()
    fanout = Fanout(history, RealtimeStats())
    await fanout.start()
    room_name = "t:a:product:1"
    early = [await history.append(room_name, "stockUpdate", "{}") for _ in range(5)]
    evicted: list[Member[Any]] = []
    room = fanout.room(room_name, lambda: offsets_delivery(evicted))
    sink = ListSink()
    member = fanout.join(room, sink, None)
    # Published after the join but before the replay is read: in both; sent once.
    both = [await history.append(room_name, "stockUpdate", "{}") for _ in range(3)]
    await asyncio.sleep(0.01)
    replay = await history.replay(room_name, early[1].offset)
    member.position = offset_position(early[1].offset)
    fanout.catch_up(room, member, replay.messages)
    later = [await history.append(room_name, "stockUpdate", "{}") for _ in range(3)]
    await asyncio.sleep(0.01)
    fanout.go_live(room, member)
    live = [await history.append(room_name, "stockUpdate", "{}") for _ in range(2)]
    await asyncio.sleep(0.01)
    expected = [m.offset for m in early[2:] + both + later + live]
    assert sink.frames == expected
    assert not evicted
    await fanout.stop()


async def test_a_full_sink_is_evicted_and_the_others_still_get_everything() -> None:
    history = MemoryHistory()
    stats = RealtimeStats()
    fanout = Fanout(history, stats)
    await fanout.start()
    evicted: list[Member[Any]] = []
    room = fanout.room("t:a:product:1", lambda: offsets_delivery(evicted))
    slow, fast = ListSink(limit=3), ListSink()
    slow_member = fanout.join(room, slow, "slow")
    for member in (slow_member, fanout.join(room, fast, "fast")):
        fanout.go_live(room, member)
    appended = [await history.append("t:a:product:1", "stockUpdate", "{}") for _ in range(6)]
    await asyncio.sleep(0.01)
    assert evicted and all(member is slow_member for member in evicted)
    assert fast.frames == [message.offset for message in appended]
    assert len(slow.frames) == 3
    # Counted by the room's transport: 6 + 3 queued; messages 4 to 6 did not fit the slow
    # sink (this test's evict leaves the member in the room, so each one counts).
    assert stats.delivered_by_transport == {"test": 9}
    assert stats.dropped_by_transport == {"test": 3}
    await fanout.stop()


def test_the_realtime_package_exports_exactly_its_documented_names() -> None:
    module = freshcache.realtime
    public = {
        name
        for name, member in vars(module).items()
        if not name.startswith("_") and not inspect.ismodule(member)
    }
    assert set(module.__all__) == public
    for name in module.__all__:
        member = getattr(module, name)
        if callable(member):
            assert member.__doc__, f"{name} has no docstring"


def test_offsets_are_checked() -> None:
    assert offset_position("1795764917238-4") == (1795764917238, 4)
    for text in ("", "12", "1-2\n", "a-1", "1-2-3", " 1-2"):
        with pytest.raises(ValueError):
            offset_position(text)
