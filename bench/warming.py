"""Cache warming after a namespace bump: database loads in the readers' path, and read
latency, with and without warming, on one private redis-server.

A popular namespace (one tenant's listing pages, ``--keys`` keys) is read by concurrent
readers with Zipf-distributed popularity; the loader stands for a database query (a few
milliseconds) and counts its calls. Once the cache is filled and the warmer has seen the
reads, the namespace is bumped under read load and the next 10 s are measured:

- cold: ``cache.bump_namespace``; readers reload what they miss (single-flight and leases
  already make that one load per key);
- warm: ``warmer.bump_and_warm``; the keys the warmer tracked are rebuilt in the
  background, most read first, by a bounded number of loads at a time.

Warming does not make fewer loads in total: each tracked key is still loaded once (and
the total is reported). What it changes is who waits for them: the loads move from the
readers' path to the background, ahead of the readers. ``db_load_ratio_warm_vs_cold`` is
the ratio of loads made in the readers' path (a reader called the loader) per second in
the 10 s after the bump; ``total_load_ratio_warm_vs_cold`` counts the warmer's loads too.
Modes alternate over rounds; each round uses a tenant of its own, a new Cache and Warmer.

Usage: ``python bench/warming.py [--quick]``; the last line printed is the figures as
JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import itertools
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from _harness import emit_figures, percentile, print_table
from freshcache import Cache, CacheKey, KeySpace, RedisStore
from freshcache.testing import RedisServer
from freshcache.warming import Warmer

Mode = Literal["cold", "warm"]
MEASURE_SECONDS = 10.0
FIRST_SECONDS = 1.0

# Who called the loader: readers set it in their tasks; the warmer's task keeps the default.
ROLE: contextvars.ContextVar[str] = contextvars.ContextVar("role", default="warmer")


@dataclass(frozen=True)
class Settings:
    """The workload."""

    rounds: int
    fill_seconds: float
    keys: int
    readers: int
    zipf_s: float
    load_ms: float
    pause_ms: float
    concurrency: int


FULL = Settings(3, 8.0, 2000, 16, 1.0, 4.0, 1.0, 32)
QUICK = Settings(1, 8.0, 2000, 16, 1.0, 4.0, 1.0, 32)


@dataclass
class Database:
    """Stands for the source of truth: each load sleeps ``load_ms`` and is recorded."""

    load_ms: float
    loads: list[tuple[float, str]] = field(default_factory=list)

    async def load(self, key: CacheKey) -> dict[str, Any]:
        self.loads.append((time.perf_counter(), ROLE.get()))
        await asyncio.sleep(self.load_ms / 1000)
        return {"page": key.parts["page"], "items": list(range(50))}


@dataclass(frozen=True)
class Outcome:
    """One mode's 10 s after the bump."""

    reader_loads: int
    warmer_loads: int
    reads: int
    latencies: list[float]  # seconds, reads started in the window
    first_latencies: list[float]  # the same, in the first second
    warm_seconds: float  # how long the warming took (0 when cold)


def zipf_weights(keys: int, s: float) -> list[float]:
    """Cumulative Zipf weights of ranks 1..keys."""
    return list(itertools.accumulate(1 / rank**s for rank in range(1, keys + 1)))


async def run_mode(url: str, mode: Mode, tenant: str, settings: Settings) -> Outcome:
    """Fill, bump (with or without warming) under read load, measure 10 s."""
    keyspace = KeySpace(prefix="warm:")
    page = keyspace.declare(
        "products:{tenantId}:category:{categoryId}:page:{page}", namespace="products:{tenantId}"
    )
    keys = [page(tenantId=tenant, categoryId="c1", page=number) for number in range(settings.keys)]
    namespace = keyspace.namespace("products:{tenantId}", tenantId=tenant)
    weights = zipf_weights(settings.keys, settings.zipf_s)
    database = Database(settings.load_ms)
    cache = Cache(RedisStore.from_url(url))
    warmer = Warmer(
        cache,
        {page: database.load},
        capacity=settings.keys,
        top=settings.keys,
        concurrency=settings.concurrency,
    )
    reads: list[tuple[float, float]] = []  # (started, seconds)
    stop = asyncio.Event()

    async def reader(seed: int) -> None:
        ROLE.set("reader")
        rng = random.Random(seed)
        while not stop.is_set():
            for key in rng.choices(keys, cum_weights=weights, k=64):
                started = time.perf_counter()
                await warmer.get_or_load(key)
                reads.append((started, time.perf_counter() - started))
                await asyncio.sleep(settings.pause_ms / 1000)
                if stop.is_set():
                    return

    readers = [asyncio.create_task(reader(seed)) for seed in range(settings.readers)]
    await asyncio.sleep(settings.fill_seconds)
    bumped = time.perf_counter()
    warm_seconds = 0.0
    if mode == "warm":
        warming = await warmer.bump_and_warm(namespace)
        await warming
        warm_seconds = time.perf_counter() - bumped
    else:
        await cache.bump_namespace(namespace)
    await asyncio.sleep(MEASURE_SECONDS - (time.perf_counter() - bumped))
    stop.set()
    await asyncio.gather(*readers)
    await warmer.aclose()
    await cache.aclose()

    end = bumped + MEASURE_SECONDS
    window = [(at, role) for at, role in database.loads if bumped <= at < end]
    latencies = [seconds for started, seconds in reads if bumped <= started < end]
    first = [seconds for started, seconds in reads if bumped <= started < bumped + FIRST_SECONDS]
    return Outcome(
        reader_loads=sum(role == "reader" for _, role in window),
        warmer_loads=sum(role == "warmer" for _, role in window),
        reads=len(latencies),
        latencies=latencies,
        first_latencies=first,
        warm_seconds=warm_seconds,
    )


async def run(settings: Settings) -> dict[str, list[Outcome]]:
    """Every round, both modes (alternating which goes first), on one redis-server."""
    outcomes: dict[str, list[Outcome]] = {"cold": [], "warm": []}
    with RedisServer() as server:
        for round_number in range(settings.rounds):
            modes: list[Mode] = ["cold", "warm"] if round_number % 2 == 0 else ["warm", "cold"]
            for mode in modes:
                outcome = await run_mode(server.url, mode, f"r{round_number}{mode}", settings)
                outcomes[mode].append(outcome)
    return outcomes


def report(outcomes: dict[str, list[Outcome]], settings: Settings) -> dict[str, object]:
    """Print the table; return the figures (medians over rounds)."""

    def median(mode: str, figure: str) -> float:
        return statistics.median(_figure(outcome, figure) for outcome in outcomes[mode])

    rows = [
        ("reader loads/s", "reader_loads_per_second"),
        ("warmer loads (total)", "warmer_loads"),
        ("all loads (total)", "all_loads"),
        ("reads/s", "reads_per_second"),
        ("p50 read ms", "p50_ms"),
        ("p99 read ms", "p99_ms"),
        ("p99 read ms, first second", "p99_first_second_ms"),
        ("warming took s", "warm_seconds"),
    ]
    print_table(
        f"Namespace bump under read load: the next {MEASURE_SECONDS:g} s "
        f"({settings.keys:,} keys, {settings.readers} readers, Zipf s={settings.zipf_s:g}, "
        f"{settings.load_ms:g} ms loads, median of {settings.rounds} round(s))",
        ["figure", "cold", "warm"],
        [[label, median("cold", name), median("warm", name)] for label, name in rows],
    )
    cold_loads = median("cold", "reader_loads_per_second")
    warm_loads = median("warm", "reader_loads_per_second")
    return {
        "db_load_ratio_warm_vs_cold": round(warm_loads / max(cold_loads, 1e-9), 3),
        "total_load_ratio_warm_vs_cold": round(
            median("warm", "all_loads") / max(median("cold", "all_loads"), 1), 3
        ),
        "reader_loads_per_second_cold": round(cold_loads, 1),
        "reader_loads_per_second_warm": round(warm_loads, 1),
        "warmer_loads": round(median("warm", "warmer_loads")),
        "p99_read_ms_cold": round(median("cold", "p99_ms"), 2),
        "p99_read_ms_warm": round(median("warm", "p99_ms"), 2),
        "p99_first_second_ms_cold": round(median("cold", "p99_first_second_ms"), 2),
        "p99_first_second_ms_warm": round(median("warm", "p99_first_second_ms"), 2),
        "warm_seconds": round(median("warm", "warm_seconds"), 2),
        "reads_per_second": round(median("cold", "reads_per_second")),
        "keys": settings.keys,
        "rounds": settings.rounds,
    }


def _figure(outcome: Outcome, name: str) -> float:
    per_second = 1 / MEASURE_SECONDS
    values = {
        "reader_loads_per_second": outcome.reader_loads * per_second,
        "warmer_loads": outcome.warmer_loads,
        "all_loads": outcome.reader_loads + outcome.warmer_loads,
        "reads_per_second": outcome.reads * per_second,
        "p50_ms": percentile(outcome.latencies, 0.5) * 1000,
        "p99_ms": percentile(outcome.latencies, 0.99) * 1000,
        "p99_first_second_ms": percentile(outcome.first_latencies, 0.99) * 1000,
        "warm_seconds": outcome.warm_seconds,
    }
    return float(values[name])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round (under 45 s)")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    started = time.perf_counter()
    outcomes = asyncio.run(run(settings))
    figures = report(outcomes, settings)
    print(f"\nelapsed: {time.perf_counter() - started:.1f} s")
    emit_figures(figures)


if __name__ == "__main__":
    main()
