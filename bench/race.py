"""Stale reads under races: freshcache's leases against plain cache-aside.

Several "processes" (each a Cache with its own Redis client, all on one private
redis-server) read, write and invalidate a few hot keys concurrently. The source of
truth is a dict of row versions; a writer increments a row's version, then invalidates
the row's cache entries, and once that call returns records the version as completed.
Loaders read a row's version, then sleep a few milliseconds as a database query would,
which holds the race window open.

A read is stale when it returns a version older than the newest one whose write and
invalidation had completed before the read started. Plain cache-aside (GET; on a miss
load, then SET; invalidate with DEL) returns such reads whenever a fill that loaded
before a write stores its value after the write's DEL: the "stale set" race. freshcache
must return none. Each kind of invalidation is exercised on its own rows: exact keys,
tag purges and namespace bumps (plain cache-aside DELs the same keys instead).

Usage: ``python bench/race.py [--quick] [--operations N] ...``; the last line printed is
the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

import redis.asyncio as redis

from _harness import emit_figures, print_table, raw_client
from freshcache import Cache, CacheKey, KeySpace, Namespace, RedisStore, Tag
from freshcache.testing import RedisServer

Kind = Literal["key", "tag", "namespace"]
KINDS: tuple[Kind, ...] = ("key", "tag", "namespace")
Loader = Callable[[], Awaitable[int]]


@dataclass(frozen=True)
class HotRow:
    """A row of the source of truth and the cache entries loaded from it."""

    name: str
    kind: Kind
    keys: tuple[CacheKey, ...]
    tag: Tag | None = None
    namespace: Namespace | None = None


def hot_rows(rows_per_kind: int, keys_per_row: int) -> list[HotRow]:
    """The workload's rows: each kind has its own template and its own rows."""
    keyspace = KeySpace(prefix="race:")
    stock = keyspace.declare("stock:{itemId}")
    offer = keyspace.declare("offer:{itemId}:{variant}", tags=["item:{itemId}"])
    page = keyspace.declare("catalog:{shard}:page:{page}", namespace="catalog:{shard}")
    rows = []
    for index in range(rows_per_kind):
        rows.append(HotRow(f"stock:{index}", "key", (stock(itemId=index),)))
        rows.append(
            HotRow(
                f"item:{index}",
                "tag",
                tuple(offer(itemId=index, variant=v) for v in range(keys_per_row)),
                tag=keyspace.tag("item:{itemId}", itemId=index),
            )
        )
        rows.append(
            HotRow(
                f"catalog:{index}",
                "namespace",
                tuple(page(shard=index, page=p) for p in range(keys_per_row)),
                namespace=keyspace.namespace("catalog:{shard}", shard=index),
            )
        )
    return rows


@dataclass(frozen=True)
class Operation:
    """A write of ``row`` when ``key`` is None, else a read of ``key``."""

    row: HotRow
    key: CacheKey | None


def operations(rows: list[HotRow], count: int, write_share: float, seed: int) -> list[Operation]:
    """The same sequence of operations for every variant (drawn from ``seed``)."""
    rng = random.Random(seed)
    drawn = []
    for _ in range(count):
        row = rng.choice(rows)
        key = None if rng.random() < write_share else rng.choice(row.keys)
        drawn.append(Operation(row, key))
    return drawn


class Variant(Protocol):
    """A way of caching: reads through a loader, invalidates a row's entries."""

    name: str

    async def read(self, process: int, key: CacheKey, loader: Loader) -> int: ...

    async def invalidate(self, process: int, row: HotRow) -> None: ...

    async def close(self) -> None: ...


class FreshcacheVariant:
    """freshcache: ``get_or_load`` under leases; invalidation by key, tag or namespace."""

    name = "freshcache"

    def __init__(self, url: str, processes: int) -> None:
        self.caches = [Cache(RedisStore.from_url(url)) for _ in range(processes)]

    async def read(self, process: int, key: CacheKey, loader: Loader) -> int:
        return await self.caches[process].get_or_load(key, loader)

    async def invalidate(self, process: int, row: HotRow) -> None:
        cache = self.caches[process]
        if row.tag is not None:
            await cache.invalidate_tags(row.tag)
        elif row.namespace is not None:
            await cache.bump_namespace(row.namespace)
        else:
            await cache.invalidate_keys(*row.keys)

    async def close(self) -> None:
        for cache in self.caches:
            await cache.aclose()


class PlainCacheAside:
    """Plain cache-aside with raw redis-py: GET; on a miss load, then SET; DEL the row's
    keys to invalidate (what an application without tags or namespaces does)."""

    name = "plain"

    def __init__(self, url: str, processes: int) -> None:
        self.clients: list[redis.Redis] = [raw_client(url) for _ in range(processes)]

    async def read(self, process: int, key: CacheKey, loader: Loader) -> int:
        client = self.clients[process]
        cached = await client.get(key.physical)
        if cached is not None:
            return int(cached)
        version = await loader()
        await client.set(key.physical, version, ex=1800)
        return version

    async def invalidate(self, process: int, row: HotRow) -> None:
        await self.clients[process].delete(*(key.physical for key in row.keys))

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()


@dataclass
class Tally:
    """What one variant's run counted."""

    variant: str
    reads: Counter[Kind] = field(default_factory=Counter)
    writes: Counter[Kind] = field(default_factory=Counter)
    stale: Counter[Kind] = field(default_factory=Counter)
    loads: Counter[Kind] = field(default_factory=Counter)
    seconds: float = 0.0


async def run_variant(
    variant: Variant,
    workload: list[Operation],
    *,
    concurrency: int,
    processes: int,
    delay_ms: tuple[float, float],
    seed: int,
) -> Tally:
    """Play ``workload`` with ``concurrency`` tasks spread over ``processes``."""
    tally = Tally(variant.name)
    versions: Counter[str] = Counter()
    completed: Counter[str] = Counter()
    rng = random.Random(seed)
    queue: Iterator[Operation] = iter(workload)

    async def read(process: int, row: HotRow, key: CacheKey) -> None:
        floor = completed[row.name]

        async def load() -> int:
            tally.loads[row.kind] += 1
            version = versions[row.name]
            await asyncio.sleep(rng.uniform(*delay_ms) / 1000)
            return version

        if await variant.read(process, key, load) < floor:
            tally.stale[row.kind] += 1
        tally.reads[row.kind] += 1

    async def write(process: int, row: HotRow) -> None:
        versions[row.name] += 1
        version = versions[row.name]
        await variant.invalidate(process, row)
        # Writes of one row may finish out of order: the newest completed one counts.
        completed[row.name] = max(completed[row.name], version)
        tally.writes[row.kind] += 1

    async def worker(process: int) -> None:
        for operation in queue:
            if operation.key is None:
                await write(process, operation.row)
            else:
                await read(process, operation.row, operation.key)

    started = time.perf_counter()
    await asyncio.gather(*(worker(index % processes) for index in range(concurrency)))
    tally.seconds = time.perf_counter() - started
    return tally


async def race(
    *,
    operations_count: int,
    concurrency: int = 32,
    processes: int = 4,
    rows_per_kind: int = 3,
    keys_per_row: int = 3,
    write_share: float = 0.1,
    delay_ms: tuple[float, float] = (1.0, 6.0),
    seed: int = 7,
) -> list[Tally]:
    """Run the same workload against freshcache and plain cache-aside on a private Redis."""
    rows = hot_rows(rows_per_kind, keys_per_row)
    workload = operations(rows, operations_count, write_share, seed)
    tallies = []
    with RedisServer() as server:
        admin = raw_client(server.url)
        factories: list[Callable[[str, int], Variant]] = [FreshcacheVariant, PlainCacheAside]
        for factory in factories:
            await admin.flushall()
            variant = factory(server.url, processes)
            try:
                tallies.append(
                    await run_variant(
                        variant,
                        workload,
                        concurrency=concurrency,
                        processes=processes,
                        delay_ms=delay_ms,
                        seed=seed,
                    )
                )
            finally:
                await variant.close()
        await admin.aclose()
    return tallies


def report(tallies: list[Tally], operations_count: int) -> dict[str, object]:
    """Print the per-kind table and return the figures."""
    by_name = {tally.variant: tally for tally in tallies}
    fresh, plain = by_name["freshcache"], by_name["plain"]
    groups = [(kind, (kind,)) for kind in KINDS] + [("total", KINDS)]
    counters = (fresh.reads, fresh.writes, fresh.stale, plain.stale, fresh.loads, plain.loads)
    rows = [
        [label, *(sum(counter[kind] for kind in kinds) for counter in counters)]
        for label, kinds in groups
    ]
    print_table(
        "Stale reads by kind of invalidation (same workload for both variants)",
        ["kind", "reads", "writes", "stale fc", "stale plain", "loads fc", "loads plain"],
        rows,
    )
    print(f"\nelapsed: freshcache {fresh.seconds:.2f} s, plain {plain.seconds:.2f} s")
    return {
        "stale_reads_freshcache": sum(fresh.stale.values()),
        "stale_reads_plain": sum(plain.stale.values()),
        "reads": sum(fresh.reads.values()),
        "writes": sum(fresh.writes.values()),
        "operations": operations_count,
        "stale_by_kind_freshcache": {kind: fresh.stale[kind] for kind in KINDS},
        "stale_by_kind_plain": {kind: plain.stale[kind] for kind in KINDS},
        "loads_freshcache": sum(fresh.loads.values()),
        "loads_plain": sum(plain.loads.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a shorter run (well under 45 s)")
    parser.add_argument("--operations", type=int, help="operations per variant")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent tasks")
    parser.add_argument("--processes", type=int, default=4, help="Cache instances (clients)")
    parser.add_argument("--write-share", type=float, default=0.1, help="share of writes")
    parser.add_argument("--min-delay-ms", type=float, default=1.0, help="shortest loader delay")
    parser.add_argument("--max-delay-ms", type=float, default=6.0, help="longest loader delay")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    operations_count = args.operations or (30_000 if args.quick else 200_000)
    tallies = asyncio.run(
        race(
            operations_count=operations_count,
            concurrency=args.concurrency,
            processes=args.processes,
            write_share=args.write_share,
            delay_ms=(args.min_delay_ms, args.max_delay_ms),
            seed=args.seed,
        )
    )
    emit_figures(report(tallies, operations_count))


if __name__ == "__main__":
    main()
