"""The service's monitoring: the metric contract on ``/metrics``, invalidations counted
once, Redis memory and evictions, the in-process alerts (``/api/alerts`` and the operator
stream), the operator's overview, the dashboard analytics job (one per interval across
instances sharing Redis), cache warming after a bump, and a ``freshcache loadgen`` run
whose hit ratio ``/metrics`` and the page's overview reproduce."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import httpx
import redis.asyncio as redis
from fastapi import FastAPI
from httpx_sse import ServerSentEvent, aconnect_sse
from prometheus_client.parser import text_string_to_metric_families

from freshcache.core.events import new_event
from freshcache.loadgen import LoadConfig, run_load
from freshcache.marketplace import Settings, create_app
from freshcache.marketplace.analytics import (
    DashboardAnalytics,
    RedisIntervalLock,
    interval_lock,
)
from freshcache.marketplace.demo import DemoTenant
from freshcache.marketplace.monitoring import OPERATOR, Monitor
from freshcache.marketplace.runtime import Runtime
from freshcache.observability import (
    CACHE_EVICTIONS,
    CACHE_MEMORY_BYTES,
    CONTRACT,
    AlertEvaluator,
    CacheHitRatioLow,
)
from freshcache.realtime.rooms import tenant_channel
from freshcache.testing import RedisServer, serve_app
from service_cases import (
    ADMIN,
    Deployment,
    cache_requests,
    running,
    samples,
    settings_for,
    settle,
    tenant_id_of,
)

PRODUCT = "/api/products/{product_id}"


def sample(response: httpx.Response, name: str, **labels: str) -> float:
    return samples(response).get((name, frozenset(labels.items())), 0.0)


def reads(response: httpx.Response) -> tuple[float, float]:
    """All cached reads on a scrape: (hits, misses)."""
    hits = misses = 0.0
    for (name, labels), value in samples(response).items():
        if name == "freshcache_cache_requests_total":
            if dict(labels)["result"] == "miss":
                misses += value
            else:
                hits += value
    return hits, misses


# -- /metrics ------------------------------------------------------------------------------


async def test_every_figure_of_the_contract_is_exported_with_bounded_labels(
    tmp_path: Path,
) -> None:
    async with running(settings_for(tmp_path)) as instance:
        deployment = Deployment("embedded", instance, instance)
        tenant = await deployment.tenant()
        product = await deployment.product(tenant, await deployment.category())
        await settle(deployment)  # the worker's late invalidation of the new product
        for _ in range(3):
            await instance.client.get(f"/api/products/{product}", headers=tenant)
        scraped = await instance.client.get("/metrics")
    families = {family.name: family for family in text_string_to_metric_families(scraped.text)}
    # The memory store keeps no byte count (the Redis test covers that gauge).
    for spec in (spec for spec in CONTRACT if spec is not CACHE_MEMORY_BYTES):
        assert spec.family in families, spec.name
        family = families[spec.family]
        assert family.type == spec.kind, spec.name
        for exported in family.samples:
            assert set(exported.labels) - {"le"} == set(spec.labels), exported
    assert cache_requests(scraped, PRODUCT, "miss") == 1
    assert cache_requests(scraped, PRODUCT, "hit") == 2
    assert product not in scraped.text  # endpoints are route templates
    assert sample(scraped, "freshcache_cache_entries") >= 1
    assert sample(scraped, "freshcache_realtime_connections", transport="sse") == 0
    assert sample(scraped, "freshcache_dashboard_refreshes_total") == 0


async def test_an_invalidation_is_counted_once_where_the_worker_applies_it(
    tmp_path: Path,
) -> None:
    async with running(settings_for(tmp_path)) as instance:
        deployment = Deployment("embedded", instance, instance)
        client, runtime = instance.client, instance.runtime
        tenant = await deployment.tenant()
        category = await deployment.category()
        product = await deployment.product(tenant, category)
        tenant_id = await tenant_id_of(deployment, tenant)
        await settle(deployment)
        before = await client.get("/metrics")

        patched = await client.patch(
            f"/api/products/{product}", json={"name": "Desk lamp"}, headers=tenant
        )
        assert patched.status_code == 200
        await settle(deployment)
        after = await client.get("/metrics")
        # The route applied the plan before answering, the worker again: counted once.
        applied = "freshcache_write_invalidations_total"
        assert (
            sample(after, applied, result="applied")
            == sample(before, applied, result="applied") + 1
        )
        change = new_event("product.updated", tenant_id, productId=product, categoryId=category)
        plan = runtime.rules.plan(change)
        name = "freshcache_invalidations_total"
        for kind, targets in (
            ("key", plan.keys),
            ("tag", plan.tags),
            ("namespace", plan.namespaces),
        ):
            increase = sample(after, name, source="outbox", kind=kind) - sample(
                before, name, source="outbox", kind=kind
            )
            assert increase == len(targets), kind
        assert plan.namespaces  # the check above is not vacuous

        key = f"product:{tenant_id}:{product}"
        event = new_event("product.updated", tenant_id, productId=product, affected_caches=[key])
        accepted = await client.post("/api/events", json=event.to_dict(), headers=tenant)
        assert accepted.status_code == 202
        await settle(deployment)
        later = await client.get("/metrics")
    event_plan = runtime.rules.plan(event)
    assert sample(later, name, source="event", kind="namespace") == len(event_plan.namespaces)
    assert sample(later, name, source="event", kind="key") == len(event_plan.keys)


async def test_redis_memory_and_evictions_are_read_when_scraped(tmp_path: Path) -> None:
    # volatile-lru: only cache entries (they have a TTL) may go, never the bus's stream.
    server = RedisServer(extra_args=("--maxmemory", "2mb", "--maxmemory-policy", "volatile-lru"))
    with server:
        async with running(settings_for(tmp_path, redis_url=server.url)) as instance:
            runtime = instance.runtime
            template = runtime.keyspace["product:{tenantId}:{productId}"]
            for number in range(400):
                await runtime.cache.set(template(tenantId="t", productId=str(number)), "x" * 10_000)
            client = redis.Redis.from_url(server.url)
            evicted_before = (await client.info("stats"))["evicted_keys"]
            scraped = await instance.client.get("/metrics")
            evicted_after = (await client.info("stats"))["evicted_keys"]
            await client.aclose()
    assert evicted_before > 0
    assert evicted_before <= sample(scraped, CACHE_EVICTIONS.name) <= evicted_after
    assert sample(scraped, CACHE_MEMORY_BYTES.name) > 1_000_000


# -- alerts and the overview ---------------------------------------------------------------


async def test_firing_alerts_are_listed_for_operators_and_pushed_on_their_stream(
    tmp_path: Path,
) -> None:
    # Caching off: every read is a miss. The rule's window and hold are shortened.
    settings = settings_for(tmp_path, cache_enabled=False, monitor_interval=3600)
    rule = CacheHitRatioLow(window=60, hold=0, min_requests_per_second=0.01)
    async with running(settings) as instance:
        deployment = Deployment("embedded", instance, instance)
        client = instance.client
        monitor: Monitor = instance.app.state.monitor
        monitor.evaluator = AlertEvaluator([rule])
        history = instance.app.state.live.realtime.history
        channel = tenant_channel(OPERATOR, "events")
        start = await history.position(channel)
        tenant = await deployment.tenant()
        product = await deployment.product(tenant, await deployment.category())
        now = time.time()
        for tick in range(2):
            for _ in range(5):
                await client.get(f"/api/products/{product}", headers=tenant)
            await monitor.tick(now + tick * 30)
        listed = await client.get("/api/alerts", headers=ADMIN)
        refused = await client.get("/api/alerts", headers=tenant)
        await monitor.tick(now + 1000)  # nothing read since: resolved
        published = await history.replay(channel, start)
    assert refused.status_code == 403
    firing = listed.json()["firing"]
    assert [(alert["name"], alert["labels"], alert["value"]) for alert in firing] == [
        ("CacheHitRatioLow", {"endpoint_group": "products"}, 0.0)
    ]
    assert firing[0]["severity"] == "warning"
    assert [message.event for message in published.messages] == ["alerts", "alerts"]
    assert '"CacheHitRatioLow"' in published.messages[0].payload
    assert '"firing":[]' in published.messages[1].payload


async def test_the_overview_charts_hit_ratio_per_endpoint_per_interval(tmp_path: Path) -> None:
    async with running(settings_for(tmp_path, monitor_interval=3600)) as instance:
        deployment = Deployment("embedded", instance, instance)
        monitor: Monitor = instance.app.state.monitor
        tenant = await deployment.tenant()
        product = await deployment.product(tenant, await deployment.category())
        await monitor.tick()
        for _ in range(4):  # a miss, then three hits
            await instance.client.get(f"/api/products/{product}", headers=tenant)
        await monitor.tick()
        overview = await instance.client.get("/api/monitoring/overview", headers=ADMIN)
        refused = await instance.client.get("/api/monitoring/overview", headers=tenant)
    assert refused.status_code == 403
    figures = overview.json()
    last = figures["points"][-1]
    assert last["hit_ratio"] == {PRODUCT: 0.75} and last["reads"] == {PRODUCT: 4}
    assert set(last["latency_ms"]) == {"hit", "miss"}
    assert figures["endpoints"][PRODUCT] == {"hits": 3, "misses": 1, "hit_ratio": 0.75}
    assert figures["firing"] == []


# -- dashboard analytics -------------------------------------------------------------------


async def test_dashboards_are_precomputed_into_the_key_the_route_reads(tmp_path: Path) -> None:
    async with running(settings_for(tmp_path)) as instance:
        deployment = Deployment("embedded", instance, instance)
        client = instance.client
        tenant = await deployment.tenant()
        product = await deployment.product(tenant, await deployment.category(), price=4)
        await client.put(f"/api/products/{product}/stock", json={"stock": 3}, headers=tenant)
        order = {"items": [{"product_id": product, "quantity": 2}]}
        assert (await client.post("/api/orders", json=order, headers=tenant)).status_code == 201
        tenant_id = await tenant_id_of(deployment, tenant)
        # The analytics job may have stored this tenant's figures before its product
        # existed (pre-computed figures may lag by design): let the route compute anew.
        runtime = instance.runtime
        await runtime.cache.delete(runtime.keyspace["dashboard:{tenantId}"](tenantId=tenant_id))
        computed_by_route = (await client.get("/api/dashboard", headers=tenant)).json()
        analytics: DashboardAnalytics = instance.app.state.analytics
        await analytics.refresh([tenant_id])
        served = await client.get("/api/dashboard", headers=tenant)
    assert served.headers["x-cache"] == "hit"
    figures = served.json()
    for field, value in computed_by_route.items():
        if field != "generated_at":
            assert figures[field] == value, field
    assert (figures["orders_today"], figures["revenue_today"], figures["low_stock"]) == (1, 8, 1)
    hour = datetime.now(UTC).hour
    assert figures["revenue_by_hour"][hour] == 8 and sum(figures["orders_by_hour"]) == 1
    assert figures["top_products"] == [{"product_id": product, "name": "Lamp", "quantity": 2}]
    assert figures["low_stock_products"] == [{"product_id": product, "name": "Lamp", "stock": 1}]
    assert analytics.stats.pushed >= 1


async def test_one_analytics_job_runs_per_interval_across_instances_sharing_redis(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    client = redis.Redis.from_url(redis_server.url)
    await client.flushdb()
    await client.aclose()
    settings = settings_for(tmp_path, redis_url=redis_server.url, run_pipeline=False)
    runtimes = [Runtime(settings), Runtime(settings)]
    for runtime in runtimes:  # one after the other: both create the SQLite schema
        await runtime.start()
    interval = 0.2
    jobs = [DashboardAnalytics(r, interval, interval_lock(r, lease=interval)) for r in runtimes]
    try:
        for job in jobs:
            job.start()
        async with asyncio.timeout(30):
            while True:
                runs = sum(job.stats.runs for job in jobs)
                if runs >= 6 and sum(job.stats.skipped for job in jobs) >= 3:
                    break
                await asyncio.sleep(0.05)
    finally:
        for job in jobs:
            await job.stop()
        for runtime in runtimes:
            await runtime.stop()
    assert all(isinstance(job.lock, RedisIntervalLock) for job in jobs)
    slots = [slot for job in jobs for slot in job.stats.slots]
    assert len(slots) == len(set(slots)), sorted(slots)


async def test_the_interval_lock_is_released_only_by_its_holder(
    redis_client: redis.Redis,
) -> None:
    lock = RedisIntervalLock(redis_client, "test-analytics", lease=60)
    token = await lock.claim(5)
    assert token is not None
    assert await lock.claim(5) is None and await lock.claim(6) is None  # held
    await lock.release("not-the-token")
    assert await lock.claim(6) is None
    await lock.release(token)
    assert await lock.claim(5) is None  # slot 5 ran already
    assert await lock.claim(6) is not None


# -- cache warming -------------------------------------------------------------------------


async def test_popular_pages_and_searches_are_rebuilt_after_a_bump_and_fresh(
    tmp_path: Path,
) -> None:
    async with running(settings_for(tmp_path)) as instance:
        deployment = Deployment("embedded", instance, instance)
        client, cache = instance.client, instance.runtime.cache
        tenant = await deployment.tenant()
        category = await deployment.category()
        product = await deployment.product(tenant, category, name="Lamp one")
        await deployment.product(tenant, category, name="Lamp two")
        await settle(deployment)
        page = {"category": category, "page": "1"}
        for _ in range(3):
            await client.get("/api/products", params=page, headers=tenant)
            await client.get("/api/marketplace/search", params={"q": "lamp"})

        renamed = {"name": "Lamp desk"}
        assert (
            await client.patch(f"/api/products/{product}", json=renamed, headers=tenant)
        ).is_success
        await settle(deployment)
        await cache.settled()
        listing = await client.get("/api/products", params=page, headers=tenant)
        search = await client.get("/api/marketplace/search", params={"q": "lamp"})
    assert listing.headers["x-cache"] == "hit" and search.headers["x-cache"] == "hit"
    assert "Lamp desk" in [item["name"] for item in listing.json()["items"]]
    assert "Lamp desk" in [item["name"] for item in search.json()["results"]]
    assert cache.warming.loaded >= 2 and cache.warming.failed == 0


# -- a loadgen run, and the real-time figures, against a real server -----------------------


@dataclass
class Served:
    url: str
    app: FastAPI
    tenants: list[DemoTenant]

    @property
    def monitor(self) -> Monitor:
        monitor: Monitor = self.app.state.monitor
        return monitor


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[Served]:
    """The service (demo data) under uvicorn, in this event loop."""
    tenants: list[DemoTenant] = []
    app = create_app(settings, on_ready=lambda _, demo: tenants.extend(demo))
    async with serve_app(app) as url:
        yield Served(url, app, tenants)


async def next_event(events: AsyncIterator[ServerSentEvent], name: str) -> ServerSentEvent:
    async with asyncio.timeout(10):
        async for event in events:
            if event.event == name:
                return event
    raise AssertionError(f"the stream ended before a {name!r} event")


async def test_loadgen_hit_ratio_matches_metrics_and_the_overview_and_streams_are_counted(
    tmp_path: Path,
) -> None:
    settings = replace(settings_for(tmp_path, monitor_interval=3600), demo=True)
    async with serving(settings) as served, httpx.AsyncClient(base_url=served.url) as client:
        tokens = tuple(tenant.api_key for tenant in served.tenants)
        await run_load(LoadConfig(served.url, tokens, requests=150, concurrency=8, seed=1))
        before = await client.get("/metrics")
        await served.monitor.tick()
        report = await run_load(LoadConfig(served.url, tokens, requests=400, concurrency=8, seed=2))
        after = await client.get("/metrics")
        await served.monitor.tick()
        overview = (await client.get("/api/monitoring/overview", headers=ADMIN)).json()

        (hits_before, misses_before), (hits_after, misses_after) = reads(before), reads(after)
        hits, misses = hits_after - hits_before, misses_after - misses_before
        loadgen = report.total.hit_ratio
        assert loadgen is not None and report.total.errors == 0
        assert abs(hits / (hits + misses) - loadgen) <= 0.02, (hits, misses, loadgen)
        point = overview["points"][-1]  # the page's "last interval" figure
        page = sum(point["reads"][e] * point["hit_ratio"][e] for e in point["reads"])
        assert abs(page / sum(point["reads"].values()) - loadgen) <= 0.02

        # A tenant's live stream: opened, an order delivered on it, closed by the client.
        token = served.tenants[0].api_key
        headers = {"Authorization": f"Bearer {token}"}
        tree = (await client.get("/api/categories")).json()["categories"]
        category_ids = [child["id"] for node in tree for child in node["children"]]
        product = None
        for category in category_ids:
            listing = await client.get(f"/api/products?category={category}", headers=headers)
            product = product or next(iter(listing.json()["items"]), None)
        assert product is not None
        async with (
            httpx.AsyncClient(timeout=10) as streaming,
            aconnect_sse(
                streaming, "GET", served.url + "/api/dashboard/live-stream", headers=headers
            ) as source,
        ):
            events = source.aiter_sse()
            await next_event(events, "metrics")
            await client.put(
                f"/api/products/{product['id']}/stock", json={"stock": 50}, headers=headers
            )
            order = {"items": [{"product_id": product["id"], "quantity": 1}]}
            assert (
                await client.post("/api/orders", json=order, headers=headers)
            ).status_code == 201
            await next_event(events, "newOrder")
        async with asyncio.timeout(10):
            while True:
                scraped = await client.get("/metrics")
                closed = sample(
                    scraped,
                    "freshcache_realtime_disconnects_total",
                    transport="sse",
                    reason="client",
                )
                if closed >= 1:
                    break
                await asyncio.sleep(0.05)
    assert sample(scraped, "freshcache_realtime_connects_total", transport="sse") >= 1
    assert sample(scraped, "freshcache_realtime_connections", transport="sse") == 0
    delivered = sample(
        scraped, "freshcache_realtime_messages_total", transport="sse", result="delivered"
    )
    assert delivered >= 2  # the figures, the new order
    assert sample(scraped, "freshcache_realtime_delivery_seconds_count", transport="sse") >= 1
    assert sample(scraped, "freshcache_dashboard_refreshes_total") >= len(served.tenants)
