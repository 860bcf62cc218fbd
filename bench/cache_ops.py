"""Cache operations on one private redis-server: hit throughput, invalidation cost, and
how big tag indexes grow in steady state.

1. Sequential get-hit throughput (one await at a time, 1 KB values) of raw redis-py, of
   freshcache on a plain and on a namespaced template, of cashews and of aiocache. Rounds
   rotate the order of the contenders; ratios are medians of per-round ratios.
2. Invalidating the 100 entries of one namespace/tag among N keys: freshcache's namespace
   bump and tag purge against ``SCAN MATCH`` + ``DEL`` (COUNT 1000). The N filler keys
   come from ``DEBUG POPULATE``.
3. Tag-index boundedness: entries with tags and short TTLs are set, filled, invalidated
   and left to expire; then ``sum(ZCARD of tag indexes) / live entries`` is sampled.

Usage: ``python bench/cache_ops.py [--quick]``; the last line printed is the figures as
JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiocache
import redis.asyncio as redis
from cashews import Cache as CashewsCache

from _harness import (
    emit_figures,
    median_ratio,
    ops_per_second,
    print_table,
    raw_client,
    rotating_rounds,
)
from freshcache import Cache, CacheKey, KeySpace, RedisStore, Tier
from freshcache.testing import RedisServer

VALUE = "v" * 1024
TARGETS = 100
SCAN_PATTERN = "fc:{products:t1}:*"  # the seed's ``products:{tenantId}:*``, physically

Getter = Callable[[], Awaitable[object]]


@dataclass(frozen=True)
class Settings:
    """How much work each part does."""

    hit_rounds: int
    hit_iterations: int
    sizes: tuple[int, ...]
    bump_repetitions: int
    purge_repetitions: int
    scan_repetitions: tuple[int, ...]
    steady_seconds: float


FULL = Settings(30, 2000, (10**4, 10**5, 10**6), 200, 50, (5, 3, 3), 12.0)
QUICK = Settings(16, 1000, (10**4, 10**5, 10**6), 50, 20, (3, 2, 1), 6.0)


def commerce_templates() -> KeySpace:
    """The two templates the benchmark reads: one plain, one in a namespace with a tag."""
    keyspace = KeySpace(prefix="fc:")
    keyspace.declare("product:{tenantId}:{productId}", tags=["product:{tenantId}:{productId}"])
    keyspace.declare(
        "products:{tenantId}:category:{categoryId}:page:{page}",
        namespace="products:{tenantId}",
        tags=["category:{tenantId}:{categoryId}"],
    )
    return keyspace


# -- 1. hit throughput ------------------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    """One way of reading a cached value; ``get`` must return ``expected`` (a hit)."""

    name: str
    get: Getter
    expected: object


async def hit_contenders(url: str, port: int, stack: contextlib.AsyncExitStack) -> list[Contender]:
    """Every contender, with its value stored and its clients closed by ``stack``."""
    raw = raw_client(url)
    stack.push_async_callback(raw.aclose)
    await raw.set(b"raw:product", VALUE.encode())

    keyspace = commerce_templates()
    product = keyspace["product:{tenantId}:{productId}"]
    page = keyspace["products:{tenantId}:category:{categoryId}:page:{page}"]
    cache = Cache(RedisStore.from_url(url))
    stack.push_async_callback(cache.aclose)
    product_key = product(tenantId="t1", productId=42)
    page_key = page(tenantId="t1", categoryId="c1", page=1)
    await cache.set(product_key, VALUE)
    await cache.set(page_key, VALUE)

    cashews = CashewsCache()
    cashews.setup(url)
    stack.push_async_callback(cashews.close)
    await cashews.set("cashews:product", VALUE)

    aio = aiocache.RedisCache(endpoint="127.0.0.1", port=port)
    stack.push_async_callback(aio.close)
    await aio.set("aiocache:product", VALUE)

    return [
        Contender("raw redis-py GET", lambda: raw.get(b"raw:product"), VALUE.encode()),
        Contender("freshcache get", lambda: cache.get(product_key), VALUE),
        Contender(
            "freshcache get, key built per call",
            lambda: cache.get(product(tenantId="t1", productId=42)),
            VALUE,
        ),
        Contender("freshcache get, namespaced", lambda: cache.get(page_key), VALUE),
        Contender("cashews get", lambda: cashews.get("cashews:product"), VALUE),
        Contender("aiocache get", lambda: aio.get("aiocache:product"), VALUE),
    ]


async def measure_hits(url: str, port: int, settings: Settings) -> dict[str, list[float]]:
    """Ops/s of every contender, one figure per round."""
    async with contextlib.AsyncExitStack() as stack:
        contenders = await hit_contenders(url, port, stack)
        for contender in contenders:
            if await contender.get() != contender.expected:
                raise RuntimeError(f"{contender.name} does not hit; nothing to measure")
            await ops_per_second(contender.get, settings.hit_iterations // 3)  # warm-up
        return await rotating_rounds(
            {contender.name: contender.get for contender in contenders},
            settings.hit_rounds,
            settings.hit_iterations,
        )


def report_hits(rates: dict[str, list[float]]) -> dict[str, float]:
    """Print the throughput table; return the hit figures."""
    raw = rates["raw redis-py GET"]
    print_table(
        "1. Sequential get-hit throughput (1 KB values)",
        ["contender", "ops/s median", "ops/s best", "vs raw (median)", "vs raw (best)"],
        [
            [
                name,
                statistics.median(rounds),
                max(rounds),
                median_ratio(rounds, raw),
                max(rounds) / max(raw),
            ]
            for name, rounds in rates.items()
        ],
    )
    fresh = rates["freshcache get"]
    return {
        "hit_ops_per_second_raw_redis": round(statistics.median(raw)),
        "hit_ops_per_second_freshcache": round(statistics.median(fresh)),
        "hit_vs_raw_redis": round(median_ratio(fresh, raw), 3),
        "key_built_hit_vs_raw_redis": round(
            median_ratio(rates["freshcache get, key built per call"], raw), 3
        ),
        "namespaced_hit_vs_raw_redis": round(
            median_ratio(rates["freshcache get, namespaced"], raw), 3
        ),
        "hit_vs_cashews": round(median_ratio(fresh, rates["cashews get"]), 3),
        "hit_vs_aiocache": round(median_ratio(fresh, rates["aiocache get"]), 3),
    }


# -- 2. invalidation cost ---------------------------------------------------------------


@dataclass(frozen=True)
class InvalidationCost:
    """Median seconds to invalidate the 100 target entries among ``size`` keys."""

    size: int
    bump: float
    purge: float
    scan: float


async def scan_and_delete(client: redis.Redis, pattern: str) -> int:
    """The wildcard invalidation freshcache replaces: SCAN the keyspace, DEL what matches."""
    deleted = 0
    cursor = 0
    while True:
        cursor, found = await client.scan(cursor, match=pattern, count=1000)
        if found:
            deleted += await client.delete(*found)
        if cursor == 0:
            return deleted


async def populate(client: redis.Redis, count: int) -> None:
    """Top the keyspace up to ``count`` filler keys (DEBUG POPULATE skips existing ones)."""
    await client.execute_command(  # type: ignore[no-untyped-call]
        "DEBUG", "POPULATE", count, "fc:filler", 32
    )


async def timed(action: Callable[[], Awaitable[object]]) -> float:
    """Seconds ``action`` takes."""
    started = time.perf_counter()
    await action()
    return time.perf_counter() - started


async def measure_invalidation(url: str, settings: Settings) -> list[InvalidationCost]:
    """Each method's median cost at each size, checking that it did invalidate."""
    keyspace = commerce_templates()
    page = keyspace["products:{tenantId}:category:{categoryId}:page:{page}"]
    targets = [page(tenantId="t1", categoryId="c1", page=number) for number in range(TARGETS)]
    namespace = keyspace.namespace("products:{tenantId}", tenantId="t1")
    tag = keyspace.tag("category:{tenantId}:{categoryId}", tenantId="t1", categoryId="c1")
    client = raw_client(url)
    cache = Cache(RedisStore.from_url(url))

    async def refill() -> None:
        await cache.set_many([(key, {"page": key.parts["page"]}) for key in targets])

    async def expect_all_gone(method: str) -> None:
        if any(value is not None for value in await cache.get_many(targets)):
            raise RuntimeError(f"{method} left target entries readable")

    costs = []
    try:
        await client.flushall()
        for size, scan_repetitions in zip(settings.sizes, settings.scan_repetitions, strict=True):
            await populate(client, size)
            bumps, purges, scans = [], [], []
            for _ in range(settings.bump_repetitions):
                await refill()
                bumps.append(await timed(lambda: cache.bump_namespace(namespace)))
            await expect_all_gone("bump_namespace")
            for _ in range(settings.purge_repetitions):
                await refill()
                purges.append(await timed(lambda: cache.invalidate_tags(tag)))
                await expect_all_gone("invalidate_tags")
            for _ in range(scan_repetitions):
                await refill()
                started = time.perf_counter()
                deleted = await scan_and_delete(client, SCAN_PATTERN)
                scans.append(time.perf_counter() - started)
                if deleted != TARGETS:
                    raise RuntimeError(f"SCAN + DEL deleted {deleted} keys, not {TARGETS}")
            costs.append(
                InvalidationCost(
                    size,
                    statistics.median(bumps),
                    statistics.median(purges),
                    statistics.median(scans),
                )
            )
        await client.flushall()
    finally:
        await cache.aclose()
        await client.aclose()
    return costs


def report_invalidation(costs: list[InvalidationCost]) -> dict[str, float]:
    """Print the cost table; return the ratios at the largest N and the growth in N."""
    print_table(
        f"2. Invalidating {TARGETS} entries of one namespace/tag among N keys (median ms)",
        ["N", "bump_namespace", "invalidate_tags", "SCAN+DEL", "scan/bump", "scan/tags"],
        [
            [
                f"{cost.size:,}",
                cost.bump * 1000,
                cost.purge * 1000,
                cost.scan * 1000,
                cost.scan / cost.bump,
                cost.scan / cost.purge,
            ]
            for cost in costs
        ],
    )
    smallest, largest = costs[0], costs[-1]
    return {
        "invalidate_vs_scan_max_n": round(largest.scan / largest.bump),
        "tag_purge_vs_scan_max_n": round(largest.scan / largest.purge),
        "bump_growth_max_vs_min_n": round(largest.bump / smallest.bump, 2),
        "tag_purge_growth_max_vs_min_n": round(largest.purge / smallest.purge, 2),
        "max_n": largest.size,
    }


# -- 3. tag-index boundedness -----------------------------------------------------------

# Short lifetimes so that entries expire many times over within seconds. The lease is
# scaled with them: 0.1 s against a ~3 s lifetime is the default 10 s against the short
# tier's 300 + 60 s. Tag index members outlive their entry by the lease at most.
BURST = Tier("burst", ttl=2.0, stale_while_revalidate=1.0, min_ttl=0.5, max_ttl=None)
STEADY_LEASE_SECONDS = 0.1
SHOPS, OFFERS_PER_SHOP, STEADY_WORKERS = 20, 250, 8


@dataclass(frozen=True)
class IndexSample:
    """Tag index members and live entries, counted at one instant."""

    live_entries: int
    index_members: int

    @property
    def ratio(self) -> float:
        return self.index_members / max(1, self.live_entries)


async def sample_index(client: redis.Redis) -> IndexSample:
    """Count live offer entries and tag index members now."""
    # SCAN skips expired keys, so these are the entries a read could still find.
    live = [key async for key in client.scan_iter(match="fc:{offer:*}", count=1000)]
    indexes = [key async for key in client.scan_iter(match="fc:tag:*", count=1000)]
    async with client.pipeline(transaction=False) as pipe:
        for index in indexes:
            pipe.zcard(index)
        sizes = await pipe.execute()
    return IndexSample(len(live), sum(sizes))


async def measure_tag_index(url: str, seconds: float) -> tuple[list[IndexSample], int]:
    """Run the steady workload; return the samples taken once it is steady, and the ops."""
    keyspace = KeySpace(prefix="fc:")
    offer = keyspace.declare(
        "offer:{tenantId}:{shopId}:{offerId}", tier=BURST, tags=["shop:{tenantId}:{shopId}"]
    )
    client = raw_client(url)
    cache = Cache(RedisStore.from_url(url), lease_seconds=STEADY_LEASE_SECONDS)
    rng = random.Random(5)
    deadline = time.monotonic() + seconds
    # Steady once the longest-lived entry of the start could have expired.
    steady_from = time.monotonic() + 2.5 + BURST.stale_while_revalidate + 0.5
    operations = 0

    def any_offer() -> CacheKey:
        return offer(
            tenantId="t1", shopId=rng.randrange(SHOPS), offerId=rng.randrange(OFFERS_PER_SHOP)
        )

    async def load() -> str:
        return "loaded"

    async def worker() -> None:
        nonlocal operations
        while time.monotonic() < deadline:
            choice = rng.random()
            if choice < 0.5:
                await cache.set(any_offer(), "set", ttl=rng.uniform(0.5, 2.5))
            elif choice < 0.8:
                await cache.get_or_load(any_offer(), load)
            else:
                await cache.invalidate_keys(any_offer())
            operations += 1

    async def sampler() -> list[IndexSample]:
        samples = []
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            if time.monotonic() >= steady_from:
                samples.append(await sample_index(client))
        return samples

    try:
        await client.flushall()
        samples, *_ = await asyncio.gather(sampler(), *(worker() for _ in range(STEADY_WORKERS)))
        await client.flushall()
    finally:
        await cache.aclose()
        await client.aclose()
    if not samples:
        raise RuntimeError(f"{seconds} s is too short to reach a steady state")
    return samples, operations


def report_tag_index(samples: list[IndexSample], operations: int, seconds: float) -> float:
    """Print the steady-state table; return the largest members/live ratio seen."""
    ratios = [sample.ratio for sample in samples]
    print_table(
        f"3. Tag indexes in steady state ({operations:,} ops in {seconds:g} s, "
        f"{len(samples)} samples once steady)",
        ["figure", "mean", "max"],
        [
            ["live entries", statistics.mean(s.live_entries for s in samples), ""],
            ["tag index members", statistics.mean(s.index_members for s in samples), ""],
            ["members / live entries", statistics.mean(ratios), max(ratios)],
        ],
    )
    return round(max(ratios), 3)


# -- main -------------------------------------------------------------------------------


async def run(settings: Settings) -> dict[str, object]:
    """The three parts on one private redis-server; return all figures."""
    figures: dict[str, object] = {}
    with RedisServer() as server:
        figures |= report_hits(await measure_hits(server.url, server.port, settings))
        figures |= report_invalidation(await measure_invalidation(server.url, settings))
        samples, operations = await measure_tag_index(server.url, settings.steady_seconds)
        figures["tag_index_vs_live"] = report_tag_index(
            samples, operations, settings.steady_seconds
        )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a shorter run (under 45 s)")
    args = parser.parse_args()
    started = time.perf_counter()
    figures = asyncio.run(run(QUICK if args.quick else FULL))
    print(f"\nelapsed: {time.perf_counter() - started:.1f} s")
    emit_figures(figures)


if __name__ == "__main__":
    main()
