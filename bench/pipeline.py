"""The change pipeline end to end: from a PostgreSQL COMMIT to the key being gone from Redis
and from another process's near cache; and near-cache hits against cashews.

Set-up, as in production, on a private PostgreSQL and a private redis-server:

- A ``products`` table watched by the outbox triggers (``install_outbox``): every UPDATE
  writes a ``product.updated`` event in its own transaction and notifies the relay. The
  rules map it to ``product:{tenantId}:{productId}``, an exact key delete.
- A *pipeline* process runs an :class:`OutboxRelay` (LISTEN/NOTIFY) and an
  :class:`InvalidationWorker` (Redis Streams bus; a Cache on Redis with a RedisBroadcast),
  as ``freshcache worker`` does.
- An *observer* process holds a Cache with a NearCache subscribed to the broadcast; every
  product is in Redis and in its near cache beforehand. It notes the wall-clock time at
  which each key leaves its near cache.
- This process commits single-row UPDATEs, each on a different product, at a steady rate
  (absolute deadlines, spread over a few connections so one slow commit does not delay
  the next one's start), noting the time each COMMIT returned. After a warm-up that is
  not counted (it also proves the pipeline is up), one phase per rate: 100/s, then
  1,000/s by default, 20 s each (4 s with ``--quick``).

The worker deletes a key from Redis before it broadcasts, so the observer's drop time
bounds "gone from Redis and from the near cache"; latency is drop time minus commit time
(``time.time()`` in both processes: one host, one clock). After each phase, updates whose
drop was not seen within 5 s of the phase's last commit, or whose key is still in Redis,
count as lost. The pipeline process stamps each event when the bus accepted it from the
relay, when the worker read it, and when the worker, its Redis deletes done, started the
broadcast (subclasses of the library's bus and broadcast, unchanged otherwise): this
splits the latency into relay, bus, apply and fan-out. Everything shares the machine's
cores: PostgreSQL, Redis, the writer and both processes.

Then, on an idle system: sequential hits on a near cache (``Cache.get`` with a subscribed
NearCache) against cashews' ``client_side=True`` cache, same 1 KB JSON value, rounds in
rotating order; both are first checked to send no command to Redis while hitting.

Usage: ``python bench/pipeline.py [--quick] [--seconds S] [--rates 100,1000]``; the last
line printed is the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import statistics
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import orjson
import redis.asyncio as redis
from cashews import Cache as CashewsCache
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy.ext.asyncio import create_async_engine

from _harness import (
    HelperProcess,
    emit_figures,
    median_ratio,
    percentile,
    print_table,
    raw_client,
    read_commands,
    reply,
    rotating_rounds,
)
from freshcache import Cache, CacheKey, RedisStore, RuleSet, commerce_keyspace
from freshcache.near import MISSING, NearCache
from freshcache.pipeline.broadcast import RedisBroadcast
from freshcache.pipeline.bus import EVENTS_TOPIC, Message, RedisStreamBus
from freshcache.pipeline.outbox import WatchedTable, install_outbox
from freshcache.pipeline.relay import OutboxRelay
from freshcache.pipeline.worker import InvalidationWorker
from freshcache.testing import PostgresServer, RedisServer

TENANT = "t1"
KEYSPACE = commerce_keyspace()
PRODUCT = KEYSPACE["product:{tenantId}:{productId}"]
RULES = RuleSet.from_mapping(
    {
        "product_update_triggers": [{"cache_keys": ["product:{tenantId}:{productId}"]}],
        "events": {"product.updated": ["product_update_triggers"]},
    },
    KEYSPACE,
)
WATCHED = WatchedTable(
    table="products",
    entity="product",
    tenant_column="tenant_id",
    id_columns={"id": "productId"},
    operations={"UPDATE": "updated"},
)
UPDATE = "UPDATE products SET price = price + 1 WHERE tenant_id = $1 AND id = $2"
# The worker's blocking read, as the service runs it; the bus's socket timeout exceeds it.
BLOCK_SECONDS = 0.5
WARMUP_UPDATES, WARMUP_RATE, WARMUP_WITHIN = 50, 50.0, 30.0
# Each stage of the latency, from one moment of an update to the next.
STAGES = {
    "relay": ("committed", "published"),
    "bus": ("published", "read"),
    "apply": ("read", "sent"),
    "fan-out": ("sent", "dropped"),
}


def product_value(product_id: int | str) -> dict[str, object]:
    """A product as cached: about 1 KB of JSON."""
    return {"id": str(product_id), "tenantId": TENANT, "name": "p", "description": "d" * 990}


def product_key(product_id: int | str) -> CacheKey:
    return PRODUCT(tenantId=TENANT, productId=product_id)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How long each part runs."""

    seconds: float
    rates: tuple[float, ...]
    writers: int
    collect_within: float
    hit_rounds: int
    hit_iterations: int


QUICK = Settings(4.0, (100.0, 1000.0), 4, 5.0, 12, 20_000)
FULL = Settings(20.0, (100.0, 1000.0), 4, 5.0, 30, 50_000)


# -- the pipeline process ---------------------------------------------------------------


def event_key(payload: bytes) -> str:
    """The physical key a product event invalidates."""
    event = orjson.loads(payload)
    return product_key(event["productId"]).physical


class StampedBus(RedisStreamBus):
    """The library's Redis Streams bus, noting when each event was accepted and read."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client)
        self.published_at: dict[str, float] = {}
        self.read_at: dict[str, float] = {}

    async def publish(self, topic: str, payload: bytes) -> str:
        message_id = await super().publish(topic, payload)
        if topic == EVENTS_TOPIC:
            self.published_at.setdefault(event_key(payload), time.time())
        return message_id

    async def read(
        self, topic: str, group: str, consumer: str, count: int, block_seconds: float
    ) -> list[Message]:
        messages = await super().read(topic, group, consumer, count, block_seconds)
        now = time.time()
        for message in messages:
            self.read_at.setdefault(event_key(message.payload), now)
        return messages


class StampedBroadcast(RedisBroadcast):
    """The library's Redis broadcast, noting when each key's invalidation was handed to it
    (the store's deletes are done by then)."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client, owns_client=True)
        self.sent_at: dict[str, float] = {}

    async def publish(self, payload: bytes, *, confirm_within: float | None = None) -> int:
        now = time.time()
        for key in orjson.loads(payload)["keys"]:
            self.sent_at.setdefault(key, now)
        return await super().publish(payload, confirm_within=confirm_within)


async def pipeline_role(database_url: str, redis_url: str) -> None:
    """Relay and worker until told to finish; then answer their counters and stamps."""
    engine = create_async_engine(database_url)
    bus = StampedBus(
        redis.Redis.from_url(
            redis_url, socket_timeout=BLOCK_SECONDS + 5.0, socket_connect_timeout=2.0
        )
    )
    broadcast = StampedBroadcast(
        redis.Redis.from_url(redis_url, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0))
    )
    cache = Cache(RedisStore.from_url(redis_url), broadcast=broadcast)
    relay = OutboxRelay(engine, bus)
    worker = InvalidationWorker(bus, RULES, cache, consumer="bench-worker")
    await bus.ensure_group(EVENTS_TOPIC, worker.group)
    tasks = [
        asyncio.create_task(relay.run()),
        asyncio.create_task(worker.run(block_seconds=BLOCK_SECONDS)),
    ]
    reply({"ready": True})
    async for _finish in read_commands():
        break
    relay.stop()
    worker.stop()
    await asyncio.gather(*tasks)
    reply(
        {
            "relayed": relay.relayed,
            "relay_failures": relay.failures,
            "worker": worker.stats.as_dict(),
            "published_at": bus.published_at,
            "read_at": bus.read_at,
            "sent_at": broadcast.sent_at,
        }
    )
    await cache.aclose()
    await bus.close()
    await engine.dispose()


# -- the observer process ---------------------------------------------------------------


class RecordingNearCache(NearCache):
    """A near cache noting when each key it held was dropped by an invalidation."""

    def __init__(self, max_entries: int, ttl: float) -> None:
        super().__init__(max_entries, ttl)
        self.dropped_at: dict[str, float] = {}

    def invalidate(
        self, keys: Iterable[str] = (), tags: Iterable[str] = (), namespaces: Iterable[str] = ()
    ) -> None:
        keys = list(keys)
        held = [key for key in keys if self.lookup(key) is not MISSING]
        super().invalidate(keys, tags, namespaces)
        now = time.time()
        for key in held:
            self.dropped_at.setdefault(key, now)


async def observer_role(redis_url: str, products: int) -> None:
    """Hold every product in a subscribed near cache; answer drop times on request."""
    near = RecordingNearCache(max_entries=products + 1, ttl=3600.0)
    broadcast = RedisBroadcast.from_url(redis_url)
    cache = Cache(RedisStore.from_url(redis_url), broadcast=broadcast, near=near)
    await cache.start()
    for product_id in range(products):
        if await cache.get(product_key(product_id)) is None:
            raise RuntimeError(f"product {product_id} is not in Redis")
    if len(near) != products:
        raise RuntimeError(f"the near cache holds {len(near)} of {products} products")
    reply({"ready": True})
    async for command in read_commands():
        if "collect" not in command:
            break
        missing = set(command["collect"])
        deadline = time.monotonic() + command["within"]
        while missing and time.monotonic() < deadline:
            missing.difference_update(near.dropped_at)
            await asyncio.sleep(0.01)
        found = {key: near.dropped_at[key] for key in command["collect"] if key in near.dropped_at}
        reply({"dropped": found})
    reply({"clears": near.stats.clears, "disconnects": broadcast.disconnects})
    await cache.aclose()


# -- the writer (this process) ----------------------------------------------------------


async def prepare_database(postgres: PostgresServer, products: int) -> None:
    """Create and fill ``products`` (before the triggers: the inserts send no events)."""
    connection = await asyncpg.connect(postgres.dsn)
    try:
        await connection.execute(
            "CREATE TABLE products (tenant_id text, id integer, name text NOT NULL, "
            "price integer NOT NULL, PRIMARY KEY (tenant_id, id))"
        )
        await connection.execute(
            "INSERT INTO products SELECT $1, g, 'product ' || g, 100 "
            "FROM generate_series(0, $2 - 1) AS g",
            TENANT,
            products,
        )
    finally:
        await connection.close()
    engine = create_async_engine(postgres.url)
    try:
        await install_outbox(engine, [WATCHED])
    finally:
        await engine.dispose()


async def preload_redis(url: str, products: int) -> None:
    """Every product's entry in Redis (the observer then reads them into its near cache)."""
    cache = Cache(RedisStore.from_url(url))
    try:
        for start in range(0, products, 1000):
            chunk = range(start, min(start + 1000, products))
            await cache.set_many([(product_key(i), product_value(i)) for i in chunk])
    finally:
        await cache.aclose()


async def commit_updates(writers: Sequence[Any], ids: Sequence[int], rate: float) -> list[float]:
    """Commit one UPDATE per id, the n-th at start + n / rate (or at once when late);
    return the wall-clock time at which each COMMIT returned. Writer k takes every k-th."""
    committed = [0.0] * len(ids)
    start = time.monotonic() + 0.05

    async def write(slot: int) -> None:
        for index in range(slot, len(ids), len(writers)):
            delay = start + index / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await writers[slot].execute(UPDATE, TENANT, ids[index])
            committed[index] = time.time()

    await asyncio.gather(*(write(slot) for slot in range(len(writers))))
    return committed


@dataclasses.dataclass
class Phase:
    """One rate's updates (physical keys), each one's moments, and what Redis still held."""

    name: str
    rate: float
    keys: list[str]
    moments: dict[str, dict[str, float]]  # moment name -> key -> wall-clock time
    left_in_redis: set[str]

    @property
    def achieved_rate(self) -> float:
        times = self.moments["committed"].values()
        return (len(self.keys) - 1) / max(max(times) - min(times), 1e-9)

    @property
    def lost(self) -> int:
        return len(set(self.keys).difference(self.moments["dropped"]) | self.left_in_redis)

    def spans_ms(self, begin: str = "committed", end: str = "dropped") -> list[float]:
        """Milliseconds from moment ``begin`` to ``end``, for the keys stamped at both."""
        first, last = self.moments.get(begin, {}), self.moments.get(end, {})
        return [
            (last[key] - first[key]) * 1000 for key in self.keys if key in first and key in last
        ]


async def run_phase(
    name: str,
    writers: Sequence[Any],
    observer: HelperProcess,
    admin: redis.Redis,
    ids: Sequence[int],
    rate: float,
    within: float,
) -> Phase:
    """Commit the updates of ``ids`` at ``rate``, then collect their drops and check Redis."""
    commits = await commit_updates(writers, ids, rate)
    keys = [product_key(i).physical for i in ids]
    answer = await observer.ask({"collect": keys, "within": within}, within + 60)
    present = []
    for start in range(0, len(keys), 1000):
        present += await admin.mget(keys[start : start + 1000])
    left = {key for key, value in zip(keys, present, strict=True) if value is not None}
    moments = {"committed": dict(zip(keys, commits, strict=True)), "dropped": answer["dropped"]}
    return Phase(name, rate, keys, moments, left)


async def run_pipeline(
    settings: Settings, postgres: PostgresServer, redis_url: str
) -> tuple[list[Phase], dict[str, Any], dict[str, Any]]:
    """The warm-up and the measured phases; return them with the helpers' final answers."""
    ids = iter(range(10**9))
    plan = [("warm-up", WARMUP_RATE, [next(ids) for _ in range(WARMUP_UPDATES)])]
    for rate in settings.rates:
        plan.append(
            (f"{rate:g}/s", rate, [next(ids) for _ in range(round(rate * settings.seconds))])
        )
    products = sum(len(phase_ids) for _, _, phase_ids in plan)
    await prepare_database(postgres, products)
    await preload_redis(redis_url, products)
    script = __file__
    async with contextlib.AsyncExitStack() as stack:
        admin = raw_client(redis_url)
        stack.push_async_callback(admin.aclose)
        pipeline = await HelperProcess.start(
            "pipeline", script, "--role", "pipeline", postgres.url, redis_url
        )
        stack.push_async_callback(pipeline.kill)
        observer = await HelperProcess.start(
            "observer", script, "--role", "observer", redis_url, str(products)
        )
        stack.push_async_callback(observer.kill)
        writers = [await asyncpg.connect(postgres.dsn) for _ in range(settings.writers)]
        for writer in writers:
            stack.push_async_callback(writer.close)
        phases = []
        for name, rate, phase_ids in plan:
            within = WARMUP_WITHIN if name == "warm-up" else settings.collect_within
            phase = await run_phase(name, writers, observer, admin, phase_ids, rate, within)
            if name == "warm-up" and phase.lost:
                raise RuntimeError(f"the pipeline lost {phase.lost} of the warm-up updates")
            phases.append(phase)
        pipeline_answer = await pipeline.finish()
        observer_answer = await observer.finish()
    for phase in phases:
        phase.moments |= {
            name: pipeline_answer[f"{name}_at"] for name in ("published", "read", "sent")
        }
    return phases[1:], pipeline_answer, observer_answer


# -- near-cache hits --------------------------------------------------------------------


Getter = Callable[[], Awaitable[object]]


async def served_in_process(get: Getter, admin: redis.Redis, expected: object) -> None:
    """Check that ``get`` returns ``expected`` without sending commands to Redis."""
    before = (await admin.info("stats"))["total_commands_processed"]
    for _ in range(1000):
        if await get() != expected:
            raise RuntimeError("a hit returned another value")
    # The INFO calls themselves, and the odd subscription health check, are allowed.
    sent = (await admin.info("stats"))["total_commands_processed"] - before
    if sent > 10:
        raise RuntimeError(f"1,000 hits sent {sent} commands to Redis: not in-process hits")


async def measure_near_hits(url: str, settings: Settings) -> dict[str, list[float]]:
    """Ops/s of near-cache hits and of cashews' client-side hits, one figure per round."""
    value = product_value("hit")
    key = product_key("hit")
    async with contextlib.AsyncExitStack() as stack:
        admin = raw_client(url)
        stack.push_async_callback(admin.aclose)
        cache = Cache(
            RedisStore.from_url(url),
            broadcast=RedisBroadcast.from_url(url),
            near=NearCache(ttl=3600.0),
        )
        await cache.start()
        stack.push_async_callback(cache.aclose)
        await cache.set(key, value)
        # The set's own broadcast comes back and drops the near copy: read after it has.
        deadline = time.monotonic() + 5
        while cache.stats.near_hits == 0 and time.monotonic() < deadline:
            await cache.get(key)
            await asyncio.sleep(0.01)
        cashews = CashewsCache()
        cashews.setup(url, client_side=True)
        stack.push_async_callback(cashews.close)
        await cashews.set("product:hit", value)
        contenders: dict[str, Getter] = {
            "freshcache near-cache get": lambda: cache.get(key),
            "cashews client_side get": lambda: cashews.get("product:hit"),
        }
        for get in contenders.values():
            await get()
            await served_in_process(get, admin, value)
        return await rotating_rounds(contenders, settings.hit_rounds, settings.hit_iterations)


# -- report -----------------------------------------------------------------------------


def report(
    phases: list[Phase],
    pipeline: dict[str, Any],
    observer: dict[str, Any],
    hits: dict[str, list[float]],
) -> dict[str, object]:
    """Print the tables; return the figures."""
    rows = []
    for phase in phases:
        spans = phase.spans_ms()
        quantiles = [percentile(spans, share) for share in (0.5, 0.9, 0.99, 1.0)]
        left = len(phase.left_in_redis)
        rows.append(
            [phase.name, phase.achieved_rate, len(phase.keys), *quantiles, left, phase.lost]
        )
    print_table(
        "1. COMMIT -> gone from Redis and from another process's near cache (ms)",
        ["phase", "achieved/s", "updates", "p50", "p90", "p99", "max", "in Redis", "lost"],
        rows,
    )
    print_table(
        "2. Where the time goes, p50 / p99 ms (relay: COMMIT -> bus accepted; bus: -> worker"
        " read; apply: -> Redis deletes done, broadcast starts; fan-out: -> near-cache drop)",
        ["phase", *STAGES],
        [
            [phase.name]
            + [
                f"{percentile(spans, 0.5):.2f} / {percentile(spans, 0.99):.2f}"
                for spans in (phase.spans_ms(*moments) for moments in STAGES.values())
            ]
            for phase in phases
        ],
    )
    worker = pipeline["worker"]
    events_per_batch = worker["events"] / max(worker["batches"], 1)
    print(
        f"\npipeline (warm-up included): {pipeline['relayed']:,} events relayed "
        f"({pipeline['relay_failures']} failed passes); {worker['events']:,} applied in "
        f"{worker['batches']:,} batches ({events_per_batch:.2f} events each, "
        f"{worker['failures']} failures); observer: {observer['clears']} near-cache clears "
        f"(1 is the subscription's start), {observer['disconnects']} disconnects"
    )
    near, cashews = hits["freshcache near-cache get"], hits["cashews client_side get"]
    print_table(
        "3. Sequential in-process hits (1 KB JSON value)",
        ["contender", "ops/s median", "ops/s best", "vs cashews (median)"],
        [
            [name, statistics.median(rounds), max(rounds), median_ratio(rounds, cashews)]
            for name, rounds in hits.items()
        ],
    )
    figures: dict[str, object] = {}
    for phase in phases:
        rate = f"{phase.rate:g}"
        figures[f"e2e_p50_ms_at_{rate}"] = round(percentile(phase.spans_ms(), 0.5), 2)
        figures[f"e2e_p99_ms_at_{rate}"] = round(percentile(phase.spans_ms(), 0.99), 2)
        figures[f"achieved_rate_at_{rate}"] = round(phase.achieved_rate, 1)
    return figures | {
        "events_lost": sum(phase.lost for phase in phases),
        "updates": sum(len(phase.keys) for phase in phases),
        "events_per_batch": round(events_per_batch, 2),
        "near_hit_ops_per_second": round(statistics.median(near)),
        "cashews_client_side_hit_ops_per_second": round(statistics.median(cashews)),
        "near_hit_vs_cashews_client_side": round(median_ratio(near, cashews), 2),
    }


async def run(settings: Settings) -> dict[str, object]:
    """Everything on a private PostgreSQL and redis-server; return the figures."""
    with PostgresServer() as postgres, RedisServer() as redis_server:
        phases, pipeline, observer = await run_pipeline(settings, postgres, redis_server.url)
        hits = await measure_near_hits(redis_server.url, settings)
    return report(phases, pipeline, observer, hits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a shorter run (under 45 s)")
    parser.add_argument("--seconds", type=float, help="seconds of updates per rate")
    parser.add_argument("--rates", help="comma-separated update rates per second")
    parser.add_argument("--role", choices=["pipeline", "observer"], help=argparse.SUPPRESS)
    parser.add_argument("role_arguments", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "pipeline":
        asyncio.run(pipeline_role(*args.role_arguments))
        return
    if args.role == "observer":
        redis_url, products = args.role_arguments
        asyncio.run(observer_role(redis_url, int(products)))
        return
    settings = QUICK if args.quick else FULL
    if args.seconds:
        settings = dataclasses.replace(settings, seconds=args.seconds)
    if args.rates:
        settings = dataclasses.replace(settings, rates=tuple(map(float, args.rates.split(","))))
    started = time.perf_counter()
    figures = asyncio.run(run(settings))
    print(f"\nelapsed: {time.perf_counter() - started:.1f} s")
    emit_figures(figures)


if __name__ == "__main__":
    main()
