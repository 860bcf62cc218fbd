"""Workers apply events from the bus to the cache (store and near caches) and the CDN:
coalesced, idempotent, retried, dead-lettered, re-claimed after a worker dies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from freshcache.cache import Cache
from freshcache.core.events import Event, new_event
from freshcache.core.keys import commerce_keyspace
from freshcache.core.rules import MARKETPLACE_RULES, RuleSet
from freshcache.pipeline.bus import Bus, MemoryBus, RedisStreamBus
from freshcache.pipeline.cdn import PurgeError
from freshcache.pipeline.worker import (
    EVENTS_TOPIC,
    InvalidationWorker,
    list_dead_letters,
    replay_dead_letters,
)
from freshcache.stores.memory import MemoryStore
from freshcache.stores.redis import RedisStore
from freshcache.testing import RedisServer

KEYSPACE = commerce_keyspace()
RULES = RuleSet.from_yaml(MARKETPLACE_RULES.read_text(), KEYSPACE)
PRODUCT = KEYSPACE["product:{tenantId}:{productId}"]
PAGE = KEYSPACE["products:{tenantId}:category:{categoryId}:page:{page}"]


class FlakyPurger:
    """A CDN that refuses the first ``failures`` purges (the CDN is not under test here)."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.purged: list[str] = []

    async def purge_tags(self, tags: Sequence[str]) -> None:
        if self.failures:
            self.failures -= 1
            raise PurgeError("CDN says 503")
        self.purged.extend(tags)

    async def purge_paths(self, paths: Sequence[str]) -> None:
        raise AssertionError("workers purge by tag")

    async def close(self) -> None:
        return None


@pytest.fixture(params=["memory", "redis"])
async def setup(
    request: pytest.FixtureRequest, redis_server: RedisServer
) -> AsyncIterator[tuple[Bus, Cache]]:
    if request.param == "memory":
        yield MemoryBus(), Cache(MemoryStore())
        return
    store = RedisStore.from_url(redis_server.url)
    assert isinstance(store, RedisStore)
    await store.client.flushdb()
    bus = RedisStreamBus(store.client)
    yield bus, Cache(store)
    await store.close()


def worker(bus: Bus, cache: Cache, **options: object) -> InvalidationWorker:
    defaults: dict[str, object] = {"retry_delay": 0.01, "claim_idle_seconds": 0.05}
    return InvalidationWorker(bus, RULES, cache, **{**defaults, **options})  # type: ignore[arg-type]


async def publish_update(bus: Bus, product_id: str = "p1", event_id: str | None = None) -> None:
    event = new_event("product.updated", "t1", productId=product_id, event_id=event_id)
    await bus.publish(EVENTS_TOPIC, event.to_json())


async def test_an_event_invalidates_what_the_rules_say(setup: tuple[Bus, Cache]) -> None:
    bus, cache = setup
    page = PAGE(tenantId="t1", categoryId="c", page=1)
    other_tenant_page = PAGE(tenantId="t2", categoryId="c", page=1)
    other_product = PRODUCT(tenantId="t1", productId="p2")
    await cache.set_many(
        [(PRODUCT(tenantId="t1", productId="p1"), 1), (page, 2), (other_tenant_page, 3)]
    )
    await cache.set(other_product, 4)
    purger = FlakyPurger()
    await publish_update(bus)
    assert await worker(bus, cache, purger=purger).process_once() == 1
    assert await cache.get_many(
        [PRODUCT(tenantId="t1", productId="p1"), page, other_tenant_page, other_product]
    ) == [None, None, 3, 4]
    assert "product:t1:p1" in purger.purged and "products:t1" in purger.purged


async def test_a_burst_is_coalesced(setup: tuple[Bus, Cache]) -> None:
    bus, cache = setup
    for number in range(300):
        await publish_update(bus, product_id=f"p{number}")
    applying = worker(bus, cache, batch_size=1000)
    assert await applying.process_once() == 300
    # 300 events x 5 targets, of which 4 namespaces are the same for every event.
    assert applying.stats.events == 300 and applying.stats.coalesced == 4 * 299
    if isinstance(cache.store, RedisStore):
        namespace = KEYSPACE.namespace("products:{tenantId}", tenantId="t1")
        assert await cache.store.client.get(namespace.generation_key) == b"1"


async def test_a_replayed_event_is_applied_once(setup: tuple[Bus, Cache]) -> None:
    bus, cache = setup
    applying = worker(bus, cache)
    await publish_update(bus, event_id="e-1")
    await applying.process_once()
    key = PRODUCT(tenantId="t1", productId="p1")
    await cache.set(key, "filled after the event")
    await publish_update(bus, event_id="e-1")
    assert await applying.process_once() == 1
    assert applying.stats.duplicates == 1
    assert await cache.get(key) == "filled after the event"


async def test_malformed_events_are_dead_lettered_and_nothing_else_happens(
    setup: tuple[Bus, Cache],
) -> None:
    bus, cache = setup
    key = PRODUCT(tenantId="t1", productId="p1")
    await cache.set(key, "kept")
    await bus.publish(EVENTS_TOPIC, b"{not json")
    await bus.publish(EVENTS_TOPIC, b'{"eventType": "product.updated"}')
    unknown = new_event("nobody.knows", "t1")
    await bus.publish(EVENTS_TOPIC, unknown.to_json())
    applying = worker(bus, cache)
    assert await applying.process_once() == 3
    assert applying.stats.dead_lettered == 3
    letters = await list_dead_letters(bus)
    assert len(letters) == 3
    assert letters[0].reason.startswith("malformed event")
    assert letters[2].payload == unknown.to_json()
    assert await cache.get(key) == "kept"


async def test_failures_are_retried_then_dead_lettered_then_replayed(
    setup: tuple[Bus, Cache],
) -> None:
    bus, cache = setup
    await publish_update(bus)
    flaky = worker(bus, cache, purger=FlakyPurger(failures=2))
    await flaky.process_once()
    await flaky.process_once()
    assert await flaky.process_once() == 1
    assert flaky.stats.failures == 2 and flaky.stats.dead_lettered == 0

    await publish_update(bus, product_id="p2")
    broken = worker(bus, cache, purger=FlakyPurger(failures=99), max_attempts=2)
    for _ in range(3):
        await broken.process_once()
    assert broken.stats.dead_lettered == 1
    assert await bus.pending(EVENTS_TOPIC, "freshcache-workers") == 0

    replayed = await replay_dead_letters(bus)
    assert [letter.reason for letter in replayed] == ["failed 2 times"]
    assert await list_dead_letters(bus) == []
    healthy = worker(bus, cache, purger=FlakyPurger())
    assert await healthy.process_once() == 1
    assert healthy.stats.events == 1


async def test_a_batch_of_a_dead_worker_is_claimed_and_finished(setup: tuple[Bus, Cache]) -> None:
    bus, cache = setup
    key = PRODUCT(tenantId="t1", productId="p1")
    await cache.set(key, "old")

    class Hanging(FlakyPurger):
        async def purge_tags(self, tags: Sequence[str]) -> None:
            await asyncio.Event().wait()

    await publish_update(bus)
    dying = asyncio.create_task(worker(bus, cache, purger=Hanging()).process_once())
    await asyncio.sleep(0.05)
    dying.cancel()  # killed in the middle of its plan: nothing was acknowledged
    await asyncio.sleep(0.1)
    survivor = worker(bus, cache, purger=FlakyPurger(), consumer="survivor")
    assert await survivor.process_once() == 1
    assert await bus.pending(EVENTS_TOPIC, "freshcache-workers") == 0
    assert await cache.get(key) is None


async def test_listeners_get_each_applied_batch_after_its_invalidations(
    setup: tuple[Bus, Cache],
) -> None:
    bus, cache = setup
    key = PRODUCT(tenantId="t1", productId="p1")
    await cache.set(key, "old")
    seen: list[tuple[str, object]] = []

    async def listener(events: Sequence[Event]) -> None:
        for event in events:
            seen.append((event.event_type, await cache.get(key)))

    await publish_update(bus)
    await worker(bus, cache, listeners=[listener]).process_once()
    assert seen == [("product.updated", None)]
