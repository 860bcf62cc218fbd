"""One conformance suite for every Store backend (memory and Redis)."""

from __future__ import annotations

import asyncio
import time

from freshcache.core.keys import CacheKey, commerce_keyspace
from freshcache.stores.base import Conflict, Entry, Store
from freshcache.stores.memory import MemoryStore

KEYSPACE = commerce_keyspace()
PRODUCT = KEYSPACE["product:{tenantId}:{productId}"]
PAGE = KEYSPACE["products:{tenantId}:category:{categoryId}:page:{page}"]


def entry(payload: bytes = b'{"v":1}', fresh: float = 60) -> Entry:
    return Entry(payload, time.time() + fresh, 0.25)


def product(product_id: str = "p1", tenant: str = "t1") -> CacheKey:
    return PRODUCT(tenantId=tenant, productId=product_id)


async def test_write_then_read_round_trips(store: Store) -> None:
    key = product()
    assert await store.read(key) is None
    written = entry()
    await store.write([(key, written, 60)])
    read = await store.read(key)
    assert read is not None
    assert read.payload == written.payload
    assert abs(read.fresh_until - written.fresh_until) < 0.002
    assert abs(read.compute_seconds - 0.25) < 0.002


async def test_read_many_mixes_hits_misses_and_namespaces(store: Store) -> None:
    page = PAGE(tenantId="t1", categoryId="c", page=1)
    await store.write([(product("a"), entry(b"1"), 60), (page, entry(b"2"), 60)])
    found = await store.read_many([product("a"), product("b"), page])
    assert [e.payload if e else None for e in found] == [b"1", None, b"2"]


async def test_entries_expire(store: Store) -> None:
    key = product()
    await store.write([(key, entry(), 0.05)])
    await asyncio.sleep(0.15)
    assert await store.read(key) is None


async def test_bump_invalidates_the_namespace_only(store: Store) -> None:
    t1 = PAGE(tenantId="t1", categoryId="c", page=1)
    t2 = PAGE(tenantId="t2", categoryId="c", page=1)
    await store.write([(t1, entry(), 60), (t2, entry(), 60), (product(), entry(), 60)])
    assert t1.namespace is not None
    await store.bump([t1.namespace])
    assert await store.read(t1) is None
    assert await store.read(t2) is not None
    assert await store.read(product()) is not None
    await store.write([(t1, entry(b"new"), 60)])
    fresh = await store.read(t1)
    assert fresh is not None and fresh.payload == b"new"


async def test_lease_is_exclusive_until_released_or_stolen(store: Store) -> None:
    key = product()
    assert await store.acquire_lease(key, "a", 5) == 0
    assert await store.acquire_lease(key, "b", 5) is None
    await store.release_lease(key, "b")  # not the holder: no effect
    assert await store.acquire_lease(key, "b", 5) is None
    assert await store.acquire_lease(key, "w", 5, steal=True) == 0
    await store.release_lease(key, "w")
    assert await store.acquire_lease(key, "c", 5) == 0


async def test_lease_expires(store: Store) -> None:
    key = product()
    assert await store.acquire_lease(key, "a", 0.05) == 0
    await asyncio.sleep(0.15)
    assert await store.commit(key, "a", 0, entry(), 60) is False
    assert await store.acquire_lease(key, "b", 5) == 0


async def test_commit_stores_under_the_current_lease(store: Store) -> None:
    key = product()
    generation = await store.acquire_lease(key, "a", 5)
    assert isinstance(generation, int)
    assert await store.commit(key, "a", generation, entry(b"x"), 60) is True
    stored = await store.read(key)
    assert stored is not None and stored.payload == b"x"
    assert await store.acquire_lease(key, "b", 5) == generation  # released by the commit


async def test_a_lease_is_not_needed_when_a_value_was_stored_meanwhile(store: Store) -> None:
    key = PAGE(tenantId="t1", categoryId="c", page=1)
    assert await store.acquire_lease(key, "a", 5, unless_stored=True) == 0
    assert await store.commit(key, "a", 0, entry(b"filled"), 60) is True
    found = await store.acquire_lease(key, "b", 5, unless_stored=True)
    assert isinstance(found, Entry) and found.payload == b"filled"
    assert await store.acquire_lease(key, "b", 5, steal=True) == 0  # a writer still takes it
    assert key.namespace is not None
    await store.bump([key.namespace])  # the stored value is now of an older generation
    await store.release_lease(key, "b")
    assert await store.acquire_lease(key, "c", 5, unless_stored=True) == 1


async def test_delete_cancels_a_fill_in_progress(store: Store) -> None:
    key = product()
    generation = await store.acquire_lease(key, "a", 5)
    assert isinstance(generation, int)
    await store.register_tags([(key, time.time() + 60)])
    await store.delete([key])
    assert await store.commit(key, "a", generation, entry(), 60) is False
    assert await store.read(key) is None


async def test_tag_purge_cancels_a_fill_in_progress(store: Store) -> None:
    key = product()
    generation = await store.acquire_lease(key, "a", 5)
    assert isinstance(generation, int)
    await store.register_tags([(key, time.time() + 60)])
    assert await store.purge_tags(key.tags) == 1
    assert await store.commit(key, "a", generation, entry(), 60) is False
    assert await store.read(key) is None


async def test_bump_cancels_a_fill_in_progress(store: Store) -> None:
    key = PAGE(tenantId="t1", categoryId="c", page=1)
    generation = await store.acquire_lease(key, "a", 5)
    assert generation == 0 and key.namespace is not None
    await store.bump([key.namespace])
    assert await store.commit(key, "a", generation, entry(), 60) is False
    assert await store.read(key) is None
    assert await store.acquire_lease(key, "b", 5) == 1


async def test_write_cancels_a_fill_in_progress(store: Store) -> None:
    key = product()
    generation = await store.acquire_lease(key, "reader", 5)
    assert isinstance(generation, int)
    await store.write([(key, entry(b"written"), 60)])
    assert await store.commit(key, "reader", generation, entry(b"older"), 60) is False
    stored = await store.read(key)
    assert stored is not None and stored.payload == b"written"


async def test_losing_write_invalidates_on_conflict(store: Store) -> None:
    key = product()
    first = await store.acquire_lease(key, "w1", 5, steal=True)
    second = await store.acquire_lease(key, "w2", 5, steal=True)
    assert isinstance(first, int) and isinstance(second, int)
    assert await store.commit(key, "w2", second, entry(b"two"), 60) is True
    lost = await store.commit(key, "w1", first, entry(b"one"), 60, Conflict.INVALIDATE)
    assert lost is False
    assert await store.read(key) is None


async def test_purge_removes_exactly_the_tagged_entries(store: Store) -> None:
    keys = [product(f"p{i}") for i in range(5)]
    other_tenant = product("p0", tenant="t2")
    everything = [*keys, other_tenant]
    await store.register_tags([(key, time.time() + 60) for key in everything])
    await store.write([(key, entry(), 60) for key in everything])
    assert await store.purge_tags([*keys[0].tags, *keys[1].tags]) == 2
    remaining = await store.read_many(everything)
    assert [e is not None for e in remaining] == [False, False, True, True, True, True]
    assert await store.tag_index_size(keys[0].tags[0]) == 0
    assert await store.tag_index_size(keys[2].tags[0]) == 1


async def test_tag_index_prunes_expired_and_deleted_members(store: Store) -> None:
    page_keys = [PAGE(tenantId="t1", categoryId="c", page=n) for n in range(4)]
    tag = page_keys[0].tags[0]
    await store.register_tags([(key, time.time() + 0.05) for key in page_keys[:3]])
    assert await store.tag_index_size(tag) == 3
    await asyncio.sleep(0.1)
    await store.register_tags([(page_keys[3], time.time() + 60)])
    assert await store.tag_index_size(tag) == 1
    await store.delete([page_keys[3]])
    assert await store.tag_index_size(tag) == 0


async def test_memory_store_is_bounded_lru() -> None:
    store = MemoryStore(max_entries=3)
    keys = [product(f"p{i}") for i in range(4)]
    await store.write([(key, entry(), 60) for key in keys[:3]])
    assert await store.read(keys[0]) is not None  # now most recently used
    await store.write([(keys[3], entry(), 60)])
    assert len(store) == 3 and store.evictions == 1
    assert await store.read(keys[1]) is None
    assert await store.read(keys[0]) is not None
