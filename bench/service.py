"""The marketplace service over HTTP, on PostgreSQL and Redis: what its cache buys.

Set-up, all in one run: a private PostgreSQL and redis-server; the service's own schema
(outbox triggers included) filled through SQL with 10,000 products of 20 tenants in 12
categories (the triggers fire; the outbox is emptied before any service starts, so no
invalidation is pending). Two service processes (``create_app`` under uvicorn, access
log off) share the database and Redis: *cached* (the default settings, with the relay
and worker) and *uncached* (``FRESHCACHE_CACHE=off``: every cached read goes to the
database). The cached one has one more route, bench-only: ``GET /bench/floor/{id}``
answers a product's record from a dict, the framework's floor (routing, validation of
the response, JSON) without authentication, cache or database.

1. Throughput, from a raw keep-alive HTTP client in this process (16 connections),
   rounds rotating the contenders: ``GET /api/marketplace/search?q=<word>`` (a
   cross-tenant query over every product) cached vs uncached, and a cached
   ``GET /api/products/{id}`` (auth included, 1,000 products already cached) vs the floor
   on the same ids. Ratios are medians of per-round ratios.
2. The hit ratio under ``freshcache loadgen``'s mix (Zipf reads, 2% writes), from the
   service's ``X-Cache`` header, in steady state: every product's record stored in Redis
   first (cache warming, through the library's ``Cache``, as a busy shop's cache holds
   its catalogue), then a warm-up of the mix, then the measured mix.
3. Stale reads after a write: three readers loop over a product's views (the product,
   its listing page, a search finding only it); a first PATCH empties their entries, so
   their fills are under way when a second PATCH (price, every other time the name too)
   commits. Once it is answered, each view is read: one not showing it is stale. The
   fills the leases refused meanwhile are counted.

Usage: ``python bench/service.py [--quick]``; the last line printed is the figures as
JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import random
import statistics
import time
from collections.abc import Sequence
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from sqlalchemy import Row, delete, insert, select

from _harness import (
    Blast,
    HelperProcess,
    emit_figures,
    http_blast,
    http_get,
    print_table,
    read_commands,
    reply,
)
from freshcache import Cache, RedisStore
from freshcache.loadgen import LoadConfig, run_load
from freshcache.marketplace import Settings, create_app
from freshcache.marketplace.auth import hash_api_key, new_api_key
from freshcache.marketplace.database import Database
from freshcache.marketplace.records import product_record
from freshcache.marketplace.routes.products import PAGE_SIZE
from freshcache.marketplace.runtime import service_keyspace
from freshcache.marketplace.schema import (
    MARKETPLACE_OWNER,
    categories,
    new_id,
    product_stock,
    products,
    shops,
    tenants,
)
from freshcache.pipeline.outbox import outbox_table
from freshcache.testing import PostgresServer, RedisServer, free_port

TENANTS, PRODUCTS = 20, 10_000
CONNECTIONS = 16  # of the raw client; the loadgen's concurrency too
ADMIN_TOKEN = "bench-admin-token-0123456789"
BERLIN = (52.52, 13.40)
CATEGORY_TREE = {
    "Outdoor": {"Tents": "tent", "Backpacks": "backpack", "Lamps": "lamp"},
    "Kitchen": {"Pans": "pan", "Knives": "knife", "Kettles": "kettle"},
    "Coffee & Tea": {"Coffee beans": "coffee", "Tea": "tea", "Grinders": "grinder"},
    "Garden": {"Hoses": "hose", "Seeds": "seeds", "Tools": "trowel"},
}
ADJECTIVES = (
    "alpine", "amber", "arctic", "bold", "brisk", "cedar", "classic", "coastal", "compact",
    "copper", "crimson", "daily", "desert", "golden", "granite", "harbor", "indigo",
    "juniper", "lunar", "maple", "nordic", "rapid", "silver", "urban",
)  # fmt: skip
SEARCH_WORDS = ADJECTIVES[:16]


@dataclasses.dataclass(frozen=True)
class Workload:
    """How long each part runs."""

    rounds: int
    blast_seconds: float
    hot_products: int
    mix_warmup: int
    mix_requests: int
    stale_iterations: int


QUICK = Workload(3, 0.8, 1000, 3000, 3000, 30)
FULL = Workload(5, 3.0, 1000, 10_000, 20_000, 200)


@dataclasses.dataclass(frozen=True)
class Product:
    """A seeded product, and where the API shows it."""

    id: str
    token: str
    name: str
    sku: str  # a word of its name no other product has: a search for it finds only it
    category: str
    page: int


# -- the data -----------------------------------------------------------------------------


@dataclasses.dataclass
class Rows:
    """The rows to insert, table by table, and the products they make."""

    categories: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    tenants: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    shops: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    products: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    stock: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    seeded: list[Product] = dataclasses.field(default_factory=list)


def marketplace_rows(rng: random.Random) -> Rows:
    """12 leaf categories in 4, 20 tenants with a shop or two near Berlin, 10,000 products
    named ``<adjective> <noun> k<5 digits>`` (the digits are the product's alone)."""
    rows, leaves = Rows(), []
    for parent, children in CATEGORY_TREE.items():
        parent_id = new_id()
        rows.categories.append({"id": parent_id, "name": parent, "parent_id": None})
        for child, noun in children.items():
            leaves.append((new_id(), noun))
            rows.categories.append({"id": leaves[-1][0], "name": child, "parent_id": parent_id})
    for number in range(TENANTS):
        tenant_id, token = new_id(), new_api_key()
        seller = f"Seller {number:02d}"
        rows.tenants.append({"id": tenant_id, "name": seller, "api_key_hash": hash_api_key(token)})
        for shop in range(rng.randint(1, 2)):
            lat, lng = BERLIN[0] + rng.uniform(-0.25, 0.25), BERLIN[1] + rng.uniform(-0.4, 0.4)
            rows.shops.append(
                {
                    "id": new_id(),
                    "tenant_id": tenant_id,
                    "name": f"{seller} {shop}",
                    "lat": lat,
                    "lng": lng,
                }
            )
        for index in range(number * PRODUCTS // TENANTS, (number + 1) * PRODUCTS // TENANTS):
            product_id, (category, noun) = new_id(), rng.choice(leaves)
            adjective, sku = rng.choice(ADJECTIVES), f"k{index:05d}"
            name = f"{adjective.title()} {noun} {sku}"
            description = f"A {adjective} {noun} by {seller}, {rng.choice(ADJECTIVES)} finish."
            rows.products.append(
                {
                    "id": product_id,
                    "tenant_id": tenant_id,
                    "name": name,
                    "description": description,
                    "price_cents": rng.randint(100, 50_000),
                    "category_id": category,
                    "images": [],
                }
            )
            quantity = rng.randint(50, 500)
            rows.stock.append(
                {"product_id": product_id, "tenant_id": tenant_id, "quantity": quantity}
            )
            rows.seeded.append(Product(product_id, token, name, sku, category, 0))
    return rows


async def seed(database_url: str) -> list[Product]:
    """Create the service's schema and fill it; return the products."""
    rows = marketplace_rows(random.Random(7))
    database = Database(database_url)
    await database.create_schema()
    async with database.write() as connection:
        owner = {"owner_id": MARKETPLACE_OWNER}
        await connection.execute(insert(categories), [row | owner for row in rows.categories])
        for table, table_rows in (
            (tenants, rows.tenants),
            (shops, rows.shops),
            (products, rows.products),
            (product_stock, rows.stock),
        ):
            await connection.execute(insert(table), table_rows)
    async with database.write() as connection:
        # Nothing is cached yet: the seed's events have nothing to invalidate.
        await connection.execute(delete(outbox_table))
    await database.dispose()
    return with_pages(rows.seeded)


async def product_rows(database_url: str) -> list[Row[Any]]:
    """Every product row."""
    database = Database(database_url)
    try:
        async with database.read() as connection:
            return list((await connection.execute(select(products))).all())
    finally:
        await database.dispose()


def with_pages(seeded: list[Product]) -> list[Product]:
    """Each product with the listing page it is on (name, then id; PostgreSQL runs with
    the C collation, Python's order for these ASCII names)."""
    listings: dict[tuple[str, str], list[Product]] = {}
    for product in seeded:
        listings.setdefault((product.token, product.category), []).append(product)
    placed = []
    for listing in listings.values():
        listing.sort(key=lambda product: (product.name, product.id))
        placed += [
            dataclasses.replace(product, page=position // PAGE_SIZE + 1)
            for position, product in enumerate(listing)
        ]
    return placed


# -- the service processes ----------------------------------------------------------------


def server_role(database_url: str, redis_url: str, port: str, cache: str, near: str) -> None:
    """One service instance under uvicorn, on the event loop ``uvicorn.run`` (so
    ``freshcache serve``) would pick (uvloop), until told to finish."""
    settings = Settings.from_env(
        {
            "FRESHCACHE_DATABASE_URL": database_url,
            "FRESHCACHE_REDIS_URL": redis_url,
            "FRESHCACHE_ADMIN_TOKEN": ADMIN_TOKEN,
            "FRESHCACHE_CACHE": cache,
            "FRESHCACHE_NEAR_CACHE_TTL": near,
            # The uncached instance leaves the pipeline to the cached one.
            "FRESHCACHE_RUN_PIPELINE": "1" if cache == "on" else "0",
        },
        demo=False,
    )
    app = create_app(settings)
    records: dict[str, dict[str, Any]] = {}

    @app.get("/bench/floor/{product_id}")
    async def floor(product_id: str) -> dict[str, Any]:
        return records[product_id]

    config = uvicorn.Config(
        app, host="127.0.0.1", port=int(port), log_level="warning", access_log=False
    )
    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(serve(app, uvicorn.Server(config), settings, records))


async def serve(
    app: FastAPI, server: uvicorn.Server, settings: Settings, records: dict[str, dict[str, Any]]
) -> None:
    """Fill the floor's records, then serve, answering the cache's counters when asked,
    until told to finish."""
    records.update(
        (row.id, product_record(row)) for row in await product_rows(settings.sqlalchemy_url)
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            raise RuntimeError("the service did not start")
        await asyncio.sleep(0.05)
    reply({"ready": True})
    async for command in read_commands():
        if "stats" not in command:
            break
        reply(app.state.runtime.cache.stats.as_dict())
    server.should_exit = True
    await serving
    reply({})


# -- 1. throughput --------------------------------------------------------------------------


async def compare(
    contenders: dict[str, tuple[int, list[bytes]]], settings: Workload
) -> dict[str, list[Blast]]:
    """Blasts of each contender (port, requests), one per round, in rotating order."""
    blasts: dict[str, list[Blast]] = {name: [] for name in contenders}
    names = list(contenders)
    for round_number in range(settings.rounds):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            port, requests = contenders[name]
            blast = await http_blast(port, requests, CONNECTIONS, settings.blast_seconds)
            if set(blast.statuses) != {200}:
                raise RuntimeError(f"{name}: statuses {dict(blast.statuses)}")
            blasts[name].append(blast)
    return blasts


async def warm(port: int, requests: list[bytes], expected: str) -> None:
    """Read each URL once, then check that a second pass answers ``X-Cache: expected``."""
    await http_blast(port, requests, CONNECTIONS)
    again = await http_blast(port, requests, CONNECTIONS)
    if again.cache_results != {expected: len(requests)}:
        raise RuntimeError(f"expected every X-Cache to be {expected}: {again.cache_results}")


async def check_floor_matches(cached: int, hot: Sequence[Product]) -> None:
    """The floor route answers the very body the cached route does."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{cached}") as client:
        for product in hot[:20]:
            auth = {"Authorization": f"Bearer {product.token}"}
            real = await client.get(f"/api/products/{product.id}", headers=auth)
            bare = await client.get(f"/bench/floor/{product.id}")
            if real.json() != bare.json():
                raise RuntimeError(f"the floor's record of {product.id} differs")


async def measure_throughput(
    cached: int, uncached: int, seeded: list[Product], settings: Workload
) -> dict[str, list[Blast]]:
    searches = [http_get(f"/api/marketplace/search?q={word}") for word in SEARCH_WORDS]
    hot = random.Random(3).sample(seeded, settings.hot_products)
    reads, floors = [], []
    for product in hot:
        auth = {"Authorization": f"Bearer {product.token}"}
        reads.append(http_get(f"/api/products/{product.id}", auth))
        floors.append(http_get(f"/bench/floor/{product.id}", auth))
    await warm(cached, searches, "hit")
    await warm(uncached, searches, "miss")
    await warm(cached, reads, "hit")
    await check_floor_matches(cached, hot)
    return await compare(
        {
            "search, cached": (cached, searches),
            "search, caching off": (uncached, searches),
            "product GET, cached": (cached, reads),
            "floor: bare route, dict": (cached, floors),
        },
        settings,
    )


def report_throughput(blasts: dict[str, list[Blast]]) -> dict[str, float]:
    def rates(name: str) -> list[float]:
        return [blast.rate for blast in blasts[name]]

    print_table(
        f"1. Requests/s over {CONNECTIONS} keep-alive connections (median of rounds)",
        ["contender", "req/s median", "req/s best", "X-Cache", "client CPU (max)"],
        [
            [
                name,
                statistics.median(rates(name)),
                max(rates(name)),
                " ".join(sorted({result or "-" for run in runs for result in run.cache_results})),
                f"{max(run.client_cpu for run in runs):.0%}",
            ]
            for name, runs in blasts.items()
        ],
    )
    search = [
        a / b for a, b in zip(rates("search, cached"), rates("search, caching off"), strict=True)
    ]
    product = [
        a / b
        for a, b in zip(rates("product GET, cached"), rates("floor: bare route, dict"), strict=True)
    ]
    return {
        "search_rps_cached": round(statistics.median(rates("search, cached"))),
        "search_rps_uncached": round(statistics.median(rates("search, caching off"))),
        "cached_vs_uncached": round(statistics.median(search), 2),
        "product_get_rps_cached": round(statistics.median(rates("product GET, cached"))),
        "floor_rps": round(statistics.median(rates("floor: bare route, dict"))),
        "product_get_vs_floor": round(statistics.median(product), 3),
    }


# -- 2. hit ratio under the mix -------------------------------------------------------------


async def warm_every_product(database_url: str, redis_url: str) -> None:
    """Store every product's record as the service stores it when it reads one (the
    specification's cache warming), through the library's Cache."""
    keyspace = service_keyspace()
    product = keyspace["product:{tenantId}:{productId}"]
    cache = Cache(RedisStore.from_url(redis_url))
    try:
        entries = [
            (product(tenantId=row.tenant_id, productId=row.id), product_record(row))
            for row in await product_rows(database_url)
        ]
        for start in range(0, len(entries), 1000):
            await cache.set_many(entries[start : start + 1000])
    finally:
        await cache.aclose()


async def measure_hit_ratio(
    cached: int, seeded: list[Product], settings: Workload
) -> dict[str, Any]:
    """The loadgen mix's figures, every product cached beforehand."""
    sample = [
        http_get(f"/api/products/{product.id}", {"Authorization": f"Bearer {product.token}"})
        for product in seeded[:: len(seeded) // 100]
    ]
    if (await http_blast(cached, sample, CONNECTIONS)).cache_results != {"hit": len(sample)}:
        raise RuntimeError("the warmed products are not served from the cache")
    config = LoadConfig(
        url=f"http://127.0.0.1:{cached}",
        tokens=tuple(dict.fromkeys(product.token for product in seeded)),
        requests=settings.mix_requests,
        warmup=settings.mix_warmup,
        concurrency=CONNECTIONS,
        around=BERLIN,
    )
    figures = (await run_load(config)).figures()
    columns = ("requests", "errors", "hit_ratio", "p50_ms_cached", "p50_ms_uncached")
    print_table(
        f"2. The loadgen mix, steady state ({figures['requests_per_second']:,.0f} req/s, "
        f"{config.write_ratio:.0%} writes, concurrency {config.concurrency})",
        ["endpoint", "requests", "errors", "hit ratio", "p50 ms cached", "p50 ms uncached"],
        [
            [name, *("" if row[column] is None else row[column] for column in columns)]
            for name, row in [*sorted(figures["endpoints"].items()), ("all", figures)]
        ],
    )
    return figures


# -- 3. stale reads after a write -----------------------------------------------------------


async def race(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], stop: asyncio.Event
) -> None:
    """Read ``url`` again and again until ``stop``: fills racing with a write."""
    while not stop.is_set():
        await client.get(url, headers=headers)


async def stale_views_after_write(
    client: httpx.AsyncClient, product: Product, version: int, rng: random.Random
) -> int:
    """How many of the product's views (itself, its listing page, a search finding it)
    do not show a write, read as soon as the write is answered."""
    auth = {"Authorization": f"Bearer {product.token}"}
    # Each URL, and where its answer lists products (None: it is the product).
    views: list[tuple[str, dict[str, str], str | None]] = [
        (f"/api/products/{product.id}", auth, None),
        (f"/api/products?category={product.category}&page={product.page}", auth, "items"),
        (f"/api/marketplace/search?q={product.sku}", {}, "results"),
    ]
    for url, headers, _ in views:  # cached now, so that a stale copy could be served
        (await client.get(url, headers=headers)).raise_for_status()
    stop = asyncio.Event()
    racers = [asyncio.create_task(race(client, url, headers, stop)) for url, headers, _ in views]
    path = f"/api/products/{product.id}"
    # A first write empties the caches: the racing readers' fills are under way when the
    # measured write commits, and must not store what they loaded before it.
    (await client.patch(path, json={"price": rng.randint(1, 99)}, headers=auth)).raise_for_status()
    change: dict[str, Any] = {"price": round(1000 + version + rng.randint(1, 99) / 100, 2)}
    if version % 2:
        change["name"] = f"{product.name} v{version}"
    (await client.patch(path, json=change, headers=auth)).raise_for_status()
    stale = 0
    for url, headers, listed_in in views:
        answer = (await client.get(url, headers=headers)).json()
        shown = [answer] if listed_in is None else answer[listed_in]
        mine = [item for item in shown if item["id"] == product.id]
        if len(mine) != 1 or any(mine[0][name] != value for name, value in change.items()):
            stale += 1
    stop.set()
    await asyncio.gather(*racers)
    return stale


async def count_stale_reads(cached: int, seeded: list[Product], iterations: int) -> int:
    """Stale GETs right after a write, over ``iterations`` writes (three GETs each)."""
    rng = random.Random(11)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{cached}") as client:
        stale = 0
        for version in range(iterations):
            stale += await stale_views_after_write(client, rng.choice(seeded), version, rng)
        return stale


# -- main -----------------------------------------------------------------------------------


async def start_servers(
    stack: contextlib.AsyncExitStack, database_url: str, redis_url: str, near: float
) -> dict[str, tuple[int, HelperProcess]]:
    """The cached (``on``) and uncached (``off``) instances, each with its port; ``stack``
    kills them."""
    servers = {}
    for cache in ("on", "off"):
        port = free_port()
        server = await HelperProcess.start(
            f"service (cache {cache})",
            *(__file__, "--role", "server", database_url, redis_url, str(port), cache, str(near)),
        )
        stack.push_async_callback(server.kill)
        servers[cache] = (port, server)
    return servers


async def run(settings: Workload, near: float) -> dict[str, object]:
    """Everything on a private PostgreSQL and redis-server; return the figures."""
    with PostgresServer() as postgres, RedisServer() as redis_server:
        seeding = time.perf_counter()
        seeded = await seed(postgres.url)
        print(f"seeded {len(seeded):,} products in {time.perf_counter() - seeding:.1f} s")
        async with contextlib.AsyncExitStack() as stack:
            servers = await start_servers(stack, postgres.url, redis_server.url, near)
            (cached, cached_server), (uncached, uncached_server) = servers["on"], servers["off"]
            figures = report_throughput(
                await measure_throughput(cached, uncached, seeded, settings)
            )
            await warm_every_product(postgres.url, redis_server.url)
            mix = await measure_hit_ratio(cached, seeded, settings)
            before = await cached_server.ask({"stats": True})
            stale = await count_stale_reads(cached, seeded, settings.stale_iterations)
            after = await cached_server.ask({"stats": True})
            await cached_server.finish()
            await uncached_server.finish()
    dropped = after["fills_dropped"] - before["fills_dropped"]
    print(
        f"\n3. Stale reads right after a write: {stale} of {3 * settings.stale_iterations} GETs "
        f"(product, listing page, search) after {settings.stale_iterations} writes; racing "
        f"readers' fills refused by the leases meanwhile: {dropped}"
    )
    return figures | {
        "hit_ratio": mix["hit_ratio"],
        "mix_errors": mix["errors"],
        "mix_requests_per_second": mix["requests_per_second"],
        "stale_reads_after_write": stale,
        "reads_checked_after_write": 3 * settings.stale_iterations,
        "fills_refused_while_checking": dropped,
        "near_cache_ttl": near,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a shorter run (under 45 s)")
    parser.add_argument(
        "--near-cache",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="run the cached instance with near caches (FRESHCACHE_NEAR_CACHE_TTL)",
    )
    parser.add_argument("--role", choices=["server"], help=argparse.SUPPRESS)
    parser.add_argument("role_arguments", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "server":
        server_role(*args.role_arguments)
        return
    started = time.perf_counter()
    figures = asyncio.run(run(QUICK if args.quick else FULL, args.near_cache))
    print(f"\nelapsed: {time.perf_counter() - started:.1f} s")
    emit_figures(figures)


if __name__ == "__main__":
    main()
