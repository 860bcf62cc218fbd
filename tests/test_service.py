"""The marketplace service, through its HTTP API.

One suite, two deployments (the ``deployment`` fixture): the embedded default (SQLite in a
temporary folder, memory store, in-process bus, relay and worker) and production
(PostgreSQL and Redis shared by TWO app instances: writes go through instance A, reads
through B, so "the next read sees the write" is checked across instances). Apps run
in-process with their lifespan; one test runs ``freshcache serve`` as a real process.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import redis.asyncio as redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from freshcache.core.events import new_event
from freshcache.core.rules import MARKETPLACE_RULES, RuleError
from freshcache.marketplace import Settings, create_app
from freshcache.marketplace.demo import DemoTenant
from freshcache.marketplace.runtime import Runtime
from freshcache.marketplace.settings import normalise_database_url
from freshcache.testing import PostgresServer, RedisServer, free_port
from service_cases import (
    ADMIN,
    Deployment,
    cache_requests,
    error_of,
    running,
    samples,
    settings_for,
    settle,
    tenant_id_of,
    today,
)

REPOSITORY = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture(params=["embedded", "shared", "shared-near"])
async def deployment(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer
) -> AsyncIterator[Deployment]:
    if request.param == "embedded":
        async with running(settings_for(tmp_path)) as instance:
            yield Deployment("embedded", instance, instance)
        return
    postgres: PostgresServer = request.getfixturevalue("postgres_server")
    client = redis.Redis.from_url(redis_server.url)
    await client.flushdb()
    await client.aclose()
    # shared-near: every instance also keeps values in memory (near caches), and each
    # invalidation waits for all of them to drop their copies.
    near = {"near_cache_ttl": 30.0} if request.param == "shared-near" else {}
    shared = settings_for(tmp_path, database_url=postgres.url, redis_url=redis_server.url, **near)
    async with running(shared) as a, running(shared) as b:
        yield Deployment("shared", a, b)


# -- read-your-writes --------------------------------------------------------------------


async def test_product_writes_are_seen_by_the_next_read_on_any_instance(
    deployment: Deployment,
) -> None:
    a, b = deployment.a.client, deployment.b.client
    tenant = await deployment.tenant()
    category = await deployment.category()
    word = "zq" + secrets.token_hex(4)
    product = await deployment.product(tenant, category, name=f"Lamp {word}", price=12.5)

    # Fill every cache that shows the product, through B.
    first = await b.get(f"/api/products/{product}", headers=tenant)
    assert first.json()["price"] == 12.5 and "stock" not in first.json()
    assert first.headers["cache-control"] == "private, max-age=1800, stale-while-revalidate=300"
    assert "authorization" in first.headers["vary"].lower()
    again = await b.get(
        f"/api/products/{product}", headers={**tenant, "If-None-Match": first.headers["etag"]}
    )
    assert again.status_code == 304
    page = f"/api/products?category={category}&page=1"
    assert [item["id"] for item in (await b.get(page, headers=tenant)).json()["items"]] == [product]
    search = f"/api/marketplace/search?q={word}"
    assert [item["price"] for item in (await b.get(search)).json()["results"]] == [12.5]

    patched = await a.patch(
        f"/api/products/{product}", json={"price": 15, "name": f"Big lamp {word}"}, headers=tenant
    )
    assert patched.status_code == 200 and patched.json()["price"] == 15
    assert (await b.get(f"/api/products/{product}", headers=tenant)).json()["price"] == 15
    listed = (await b.get(page, headers=tenant)).json()["items"]
    assert [(item["name"], item["price"]) for item in listed] == [(f"Big lamp {word}", 15)]
    assert [item["price"] for item in (await b.get(search)).json()["results"]] == [15]

    second = await deployment.product(tenant, category, name=f"Another lamp {word}")
    listed = (await b.get(page, headers=tenant)).json()["items"]
    assert {item["id"] for item in listed} == {product, second}
    assert len((await b.get(search)).json()["results"]) == 2

    assert (await a.delete(f"/api/products/{product}", headers=tenant)).status_code == 204
    error_of(await b.get(f"/api/products/{product}", headers=tenant), 404)
    assert [item["id"] for item in (await b.get(page, headers=tenant)).json()["items"]] == [second]
    assert [item["id"] for item in (await b.get(search)).json()["results"]] == [second]


async def test_public_data_writes_are_seen_by_the_next_read(deployment: Deployment) -> None:
    a, b = deployment.a.client, deployment.b.client
    tree = await b.get("/api/categories")
    assert tree.headers["cache-control"].startswith("public, max-age=3600")
    parent = await deployment.category("Garden " + secrets.token_hex(3))
    child = await a.post(
        "/api/categories", json={"name": "Hoses", "parent_id": parent}, headers=ADMIN
    )
    renamed = await a.patch(f"/api/categories/{parent}", json={"name": "Yard"}, headers=ADMIN)
    assert renamed.status_code == 200
    roots = {node["id"]: node for node in (await b.get("/api/categories")).json()["categories"]}
    assert roots[parent]["name"] == "Yard"
    assert [node["id"] for node in roots[parent]["children"]] == [child.json()["id"]]
    moved = await a.patch(f"/api/categories/{parent}", json={"parent_id": parent}, headers=ADMIN)
    assert "parent_id" in error_of(moved, 422)

    # A spot nobody else uses; requests a few hundred metres apart share one entry.
    lat, lng = round(-60 + secrets.randbelow(1000) / 100, 2), 100.0
    nearby = f"/api/marketplace/shops/nearby?lat={lat + 0.001}&lng={lng}&radius=3"
    empty = await b.get(nearby)
    assert empty.json()["shops"] == [] and empty.json()["radius_km"] == 5
    assert empty.headers["cache-control"].startswith("public, max-age=300")
    tenant = await deployment.tenant()
    shop = await a.post(
        "/api/shops", json={"name": "Kiosk", "lat": lat, "lng": lng}, headers=tenant
    )
    assert shop.status_code == 201, shop.text
    await settle(deployment)
    shifted = f"/api/marketplace/shops/nearby?lat={lat - 0.002}&lng={lng + 0.001}&radius=4.5"
    found = (await b.get(shifted)).json()
    assert [entry["id"] for entry in found["shops"]] == [shop.json()["id"]]
    assert found["lat"] == lat and found["lng"] == lng
    hits_before = cache_requests(await b.get("/metrics"), "/api/marketplace/shops/nearby", "hit")
    assert (await b.get(nearby)).json() == found
    hits_after = cache_requests(await b.get("/metrics"), "/api/marketplace/shops/nearby", "hit")
    assert hits_after == hits_before + 1

    # A located search lists the products of sellers with a shop nearby, nearest first.
    category = await deployment.category()
    word = "zq" + secrets.token_hex(4)
    await deployment.product(tenant, category, name=f"Map {word}")
    located = (await b.get(f"/api/marketplace/search?q={word}&location={lat},{lng}")).json()
    assert [item["seller"] for item in located["results"]] == ["T"]
    far = (await b.get(f"/api/marketplace/search?q={word}&location={-lat},{lng}")).json()
    assert far["results"] == []


async def test_user_profiles_are_fresh_after_updates(deployment: Deployment) -> None:
    a, b = deployment.a.client, deployment.b.client
    tenant = await deployment.tenant()
    user = await a.post(
        "/api/users", json={"name": "Ann", "email": "ann@x.example"}, headers=tenant
    )
    profile = f"/api/users/{user.json()['id']}/profile"
    assert (await b.get(profile, headers=tenant)).json()["name"] == "Ann"
    updated = await a.patch(profile, json={"email": "ann@y.example"}, headers=tenant)
    assert updated.json()["email"] == "ann@y.example"
    assert (await b.get(profile, headers=tenant)).json()["email"] == "ann@y.example"


async def test_a_row_changed_by_sql_is_invalidated_through_the_outbox(
    deployment: Deployment,
) -> None:
    tenant = await deployment.tenant()
    product = await deployment.product(tenant, await deployment.category(), name="Old name")
    path = f"/api/products/{product}"
    assert (await deployment.b.client.get(path, headers=tenant)).json()["name"] == "Old name"

    # Another writer (a script, psql): the service only hears of it from the outbox.
    engine = create_async_engine(deployment.a.runtime.settings.sqlalchemy_url)
    async with engine.begin() as connection:
        await connection.execute(
            text("UPDATE products SET name = 'New name' WHERE id = :id"), {"id": product}
        )
    await engine.dispose()
    deadline = time.monotonic() + 30
    while (await deployment.b.client.get(path, headers=tenant)).json()["name"] != "New name":
        assert time.monotonic() < deadline, "the change never reached the cache"
        await asyncio.sleep(0.05)


# -- stock and orders --------------------------------------------------------------------


async def test_stock_is_live_and_never_cached(deployment: Deployment) -> None:
    a, b = deployment.a.client, deployment.b.client
    tenant = await deployment.tenant()
    product = await deployment.product(tenant, await deployment.category())
    base = await b.get(f"/api/products/{product}", headers=tenant)
    put = await a.put(f"/api/products/{product}/stock", json={"stock": 7}, headers=tenant)
    assert put.json() == {"product_id": product, "stock": 7}
    stock = await b.get(f"/api/products/{product}/stock", headers=tenant)
    assert stock.json()["stock"] == 7 and stock.headers["cache-control"] == "no-store"
    complete = await b.get(f"/api/products/{product}?include=stock", headers=tenant)
    assert complete.json() == {**base.json(), "stock": 7}
    assert complete.headers["cache-control"] == "no-store"
    await a.put(f"/api/products/{product}/stock", json={"stock": 2}, headers=tenant)
    complete = await b.get(f"/api/products/{product}?include=stock", headers=tenant)
    assert complete.json()["stock"] == 2


async def test_orders_take_stock_atomically(deployment: Deployment) -> None:
    a, b = deployment.a.client, deployment.b.client
    tenant = await deployment.tenant()
    category = await deployment.category()
    tent = await deployment.product(tenant, category, price=5)
    lamp = await deployment.product(tenant, category, price=5)
    for product, stock in ((tent, 5), (lamp, 2)):
        await a.put(f"/api/products/{product}/stock", json={"stock": stock}, headers=tenant)

    async def stock_of(product: str) -> int:
        response = await b.get(f"/api/products/{product}/stock", headers=tenant)
        return int(response.json()["stock"])

    short = {"items": [{"product_id": tent, "quantity": 3}, {"product_id": lamp, "quantity": 3}]}
    message = error_of(await a.post("/api/orders", json=short, headers=tenant), 409)
    assert lamp in message
    assert (await stock_of(tent), await stock_of(lamp)) == (5, 2)
    unknown = {
        "items": [{"product_id": tent, "quantity": 1}, {"product_id": "nope", "quantity": 1}]
    }
    error_of(await a.post("/api/orders", json=unknown, headers=tenant), 404)
    assert await stock_of(tent) == 5

    fits = {"items": [{"product_id": tent, "quantity": 3}, {"product_id": lamp, "quantity": 2}]}
    placed = await a.post("/api/orders", json=fits, headers=tenant)
    assert placed.status_code == 201, placed.text
    order = placed.json()
    assert order["total"] == 25 and order["status"] == "pending"
    assert (await stock_of(tent), await stock_of(lamp)) == (2, 0)
    fetched = await b.get(f"/api/orders/{order['id']}", headers=tenant)
    assert fetched.json() == order and fetched.headers["cache-control"] == "no-store"

    shipped = {"status": "shipped", "tracking_number": "TRK123456", "estimated_delivery": today()}
    patched = await a.patch(f"/api/orders/{order['id']}", json=shipped, headers=tenant)
    assert patched.json()["tracking_number"] == "TRK123456"
    assert (await b.get(f"/api/orders/{order['id']}", headers=tenant)).json()["status"] == "shipped"
    cancel = await a.patch(
        f"/api/orders/{order['id']}", json={"status": "cancelled"}, headers=tenant
    )
    assert cancel.json()["status"] == "cancelled"
    assert (await stock_of(tent), await stock_of(lamp)) == (5, 2)
    again = {"status": "shipped"}
    error_of(await a.patch(f"/api/orders/{order['id']}", json=again, headers=tenant), 409)

    # Concurrent orders through both instances never oversell.
    one = {"items": [{"product_id": tent, "quantity": 1}]}
    results = await asyncio.gather(
        *(client.post("/api/orders", json=one, headers=tenant) for client in (a, b) * 5)
    )
    assert sorted(response.status_code for response in results) == [201] * 5 + [409] * 5
    assert await stock_of(tent) == 0


async def test_reports_and_dashboard(deployment: Deployment) -> None:
    a, b = deployment.a.client, deployment.b.client
    tenant = await deployment.tenant()
    product = await deployment.product(tenant, await deployment.category(), price=4)
    await a.put(f"/api/products/{product}/stock", json={"stock": 3}, headers=tenant)
    order = {"items": [{"product_id": product, "quantity": 2}]}
    assert (await a.post("/api/orders", json=order, headers=tenant)).status_code == 201

    report = await b.get(f"/api/reports/daily/{today()}", headers=tenant)
    assert report.json()["orders"] == 1 and report.json()["revenue"] == 8
    assert report.json()["top_products"] == [{"product_id": product, "name": "Lamp", "quantity": 2}]
    assert report.headers["cache-control"].startswith("private, max-age=300")
    yesterday = (datetime.now(UTC).date() - timedelta(days=1)).isoformat()
    past = await b.get(f"/api/reports/daily/{yesterday}", headers=tenant)
    assert past.json()["orders"] == 0
    assert past.headers["cache-control"].startswith("private, max-age=3600")
    tomorrow = (datetime.now(UTC).date() + timedelta(days=1)).isoformat()
    error_of(await b.get(f"/api/reports/daily/{tomorrow}", headers=tenant), 422)
    assert "day" in error_of(await b.get("/api/reports/daily/2024-13-01", headers=tenant), 422)

    dashboard = await b.get("/api/dashboard", headers=tenant)
    figures = dashboard.json()
    assert (figures["products"], figures["low_stock"], figures["orders_today"]) == (1, 1, 1)
    assert figures["pending_orders"] == 1 and figures["revenue_today"] == 8
    assert dashboard.headers["cache-control"].startswith("private, max-age=300")


async def test_application_events(deployment: Deployment) -> None:
    a = deployment.a.client
    tenant = await deployment.tenant()
    other = await deployment.tenant()
    product = await deployment.product(tenant, await deployment.category())
    await settle(deployment)
    await a.get(f"/api/products/{product}", headers=tenant)
    tenant_id = await tenant_id_of(deployment, tenant)
    key = deployment.a.runtime.keyspace["product:{tenantId}:{productId}"]
    cached = key(tenantId=tenant_id, productId=product)
    assert await deployment.a.runtime.cache.get(cached) is not None

    event = new_event("product.updated", tenant_id, productId=product).to_dict()
    accepted = await a.post("/api/events", json=event, headers=tenant)
    assert accepted.status_code == 202, accepted.text
    assert f"delete key product:{tenant_id}:{product}" in accepted.json()["invalidated"]
    assert await deployment.a.runtime.cache.get(cached) is None

    error_of(await a.post("/api/events", json=event, headers=other), 403)
    foreign = {**event, "affectedCaches": ["product:someone-else:p1"]}
    assert "affectedCaches" in error_of(
        await a.post("/api/events", json=foreign, headers=tenant), 422
    )
    untyped = {key: value for key, value in event.items() if key != "eventType"}
    assert "eventType" in error_of(await a.post("/api/events", json=untyped, headers=tenant), 422)
    error_of(await a.post("/api/events", content=b"{not json", headers=tenant), 422)


# -- isolation and validation ------------------------------------------------------------


async def test_no_route_reaches_another_tenants_data(deployment: Deployment) -> None:
    a, b = deployment.a.client, deployment.b.client
    owner, intruder = await deployment.tenant(), await deployment.tenant()
    category = await deployment.category()
    product = await deployment.product(owner, category)
    await a.put(f"/api/products/{product}/stock", json={"stock": 5}, headers=owner)
    user = await a.post("/api/users", json={"name": "U", "email": "u@x.example"}, headers=owner)
    order = await a.post(
        "/api/orders", json={"items": [{"product_id": product, "quantity": 1}]}, headers=owner
    )
    await b.get(f"/api/products/{product}", headers=owner)  # cached for the owner

    attempts = [
        ("GET", f"/api/products/{product}", None),
        ("GET", f"/api/products/{product}?include=stock", None),
        ("PATCH", f"/api/products/{product}", {"price": 0}),
        ("DELETE", f"/api/products/{product}", None),
        ("GET", f"/api/products/{product}/stock", None),
        ("PUT", f"/api/products/{product}/stock", {"stock": 0}),
        ("GET", f"/api/users/{user.json()['id']}/profile", None),
        ("PATCH", f"/api/users/{user.json()['id']}/profile", {"name": "X"}),
        ("GET", f"/api/orders/{order.json()['id']}", None),
        ("PATCH", f"/api/orders/{order.json()['id']}", {"status": "cancelled"}),
        ("POST", "/api/orders", {"items": [{"product_id": product, "quantity": 1}]}),
    ]
    for method, path, body in attempts:
        for client in (a, b):
            response = await client.request(method, path, json=body, headers=intruder)
            error_of(response, 404)
    listing = await b.get(f"/api/products?category={category}", headers=intruder)
    assert listing.json()["items"] == []

    assert (await b.get(f"/api/products/{product}", headers=owner)).json()["price"] == 10
    assert (await b.get(f"/api/products/{product}/stock", headers=owner)).json()["stock"] == 4
    assert (await b.get(f"/api/orders/{order.json()['id']}", headers=owner)).json()[
        "status"
    ] == "pending"

    path = f"/api/products/{product}"
    error_of(await b.get(path), 401)
    error_of(await b.get(path, headers={"Authorization": "Bearer fc_unknown"}), 401)
    error_of(await b.get(path, headers={"Authorization": "Basic abc"}), 401)
    error_of(await b.get(path, headers=ADMIN), 401)
    error_of(await a.post("/api/tenants", json={"name": "X"}, headers=owner), 403)
    error_of(await a.post("/api/categories", json={"name": "X"}, headers=owner), 403)
    smuggled = {"name": "L", "price": 1, "category_id": category, "tenant_id": "other"}
    assert "tenant_id" in error_of(await a.post("/api/products", json=smuggled, headers=owner), 422)


HOSTILE_IDS = ["*", "%2A", ":", "a:b", "..%2F", "%00", "a b", "{x}", "x" * 10_240]


async def test_hostile_ids_get_a_clear_4xx_and_touch_nothing(deployment: Deployment) -> None:
    a = deployment.a.client
    tenant = await deployment.tenant()
    product = await deployment.product(tenant, await deployment.category())
    stats = deployment.a.runtime.cache.stats.as_dict()
    for hostile in HOSTILE_IDS:
        for method, path in (
            ("GET", f"/api/products/{hostile}"),
            ("PATCH", f"/api/products/{hostile}"),
            ("DELETE", f"/api/products/{hostile}"),
            ("PUT", f"/api/products/{hostile}/stock"),
            ("GET", f"/api/users/{hostile}/profile"),
            ("GET", f"/api/orders/{hostile}"),
            ("GET", f"/api/products?category={hostile}"),
        ):
            body = {"stock": 1} if method == "PUT" else {"name": "X"}
            response = await a.request(method, path, headers=tenant, json=body)
            assert response.status_code in (404, 422), (path, response.status_code)
            assert response.json()["error"]["message"]
    assert deployment.a.runtime.cache.stats.as_dict() == stats
    assert (await a.get(f"/api/products/{product}", headers=tenant)).json()["name"] == "Lamp"


async def test_bad_input_names_the_field_and_writes_nothing(deployment: Deployment) -> None:
    a = deployment.a.client
    tenant = await deployment.tenant()
    category = await deployment.category()
    valid = {"name": "Lamp", "price": 10, "category_id": category}
    for change, field in (
        ({"price": "abc"}, "price"),
        ({"price": -1}, "price"),
        ({"price": 1.234}, "price"),
        ({"name": ""}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"images": ["not a url"]}, "images"),
        ({"category_id": "missing"}, "category_id"),
        ({"category_id": "*"}, "category_id"),
    ):
        response = await a.post("/api/products", json={**valid, **change}, headers=tenant)
        assert field in error_of(response, 422), change
    missing = {key: value for key, value in valid.items() if key != "name"}
    assert "name" in error_of(await a.post("/api/products", json=missing, headers=tenant), 422)
    listing = await a.get(f"/api/products?category={category}", headers=tenant)
    assert listing.json()["items"] == []

    product = await deployment.product(tenant, category)
    path = f"/api/products/{product}"
    error_of(await a.patch(path, json={}, headers=tenant), 422)
    assert "name" in error_of(await a.patch(path, json={"name": None}, headers=tenant), 422)
    assert "body.x" in error_of(await a.patch(path, json={"price": 1, "x": 1}, headers=tenant), 422)
    assert "stock" in error_of(
        await a.put(f"{path}/stock", json={"stock": -1}, headers=tenant), 422
    )
    assert "stock" in error_of(
        await a.put(f"{path}/stock", json={"stock": "5"}, headers=tenant), 422
    )
    assert (await a.get(path, headers=tenant)).json()["price"] == 10
    assert (await a.get(f"{path}/stock", headers=tenant)).json()["stock"] == 0

    for body, field in (
        ({"items": []}, "items"),
        ({"items": [{"product_id": product, "quantity": 0}]}, "quantity"),
        ({"items": [{"product_id": product, "quantity": 1}] * 2}, "product_id"),
        ({"items": [{"product_id": product}]}, "quantity"),
    ):
        assert field in error_of(await a.post("/api/orders", json=body, headers=tenant), 422)
    shop = {"name": "S", "lat": 91, "lng": 0}
    assert "lat" in error_of(await a.post("/api/shops", json=shop, headers=tenant), 422)
    assert "q" in error_of(await a.get("/api/marketplace/search?q=%20"), 422)
    assert "location" in error_of(await a.get("/api/marketplace/search?q=a&location=x"), 422)
    assert "radius" in error_of(
        await a.get("/api/marketplace/shops/nearby?lat=1&lng=1&radius=500"), 422
    )
    assert "name" in error_of(await a.post("/api/tenants", json={"name": ""}, headers=ADMIN), 422)


# -- operations --------------------------------------------------------------------------


async def test_health_and_metrics(deployment: Deployment) -> None:
    b = deployment.b.client
    tenant = await deployment.tenant()
    product = await deployment.product(tenant, await deployment.category())
    assert (await b.get("/healthz")).json()["status"] == "ok"
    for _ in range(2):
        await b.get(f"/api/products/{product}", headers=tenant)
    await b.get(f"/api/products/{product}/stock", headers=tenant)
    scraped = await b.get("/metrics")
    assert scraped.headers["content-type"].startswith("text/plain")
    assert cache_requests(scraped, "/api/products/{product_id}", "miss") >= 1
    assert cache_requests(scraped, "/api/products/{product_id}", "hit") >= 1
    scraped_samples = samples(scraped)
    for endpoint, cache in (
        ("/api/products/{product_id}", "hit"),
        ("/api/products/{product_id}", "miss"),
        ("/api/products/{product_id}/stock", "none"),
    ):
        labels = frozenset({("endpoint", endpoint), ("method", "GET"), ("cache", cache)})
        assert scraped_samples[("freshcache_http_request_duration_seconds_count", labels)] >= 1
    assert product not in scraped.text
    assert "freshcache_cache_operations_total" in scraped.text


# -- the command, the demo, the configuration --------------------------------------------


def test_serve_runs_the_embedded_default_with_demo_data(tmp_path: Path) -> None:
    port = free_port()
    environment = {**os.environ, "FRESHCACHE_DATA_DIR": str(tmp_path / "data")}
    environment.pop("FRESHCACHE_DATABASE_URL", None)
    environment.pop("FRESHCACHE_REDIS_URL", None)
    command = [str(Path(sys.executable).parent / "freshcache"), "serve", "--port", str(port)]
    server = subprocess.Popen(
        command,
        env=environment,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert server.stdout is not None
        output = ""
        deadline = time.monotonic() + 60
        while "Application startup complete" not in output:
            assert time.monotonic() < deadline and server.poll() is None, output
            output += server.stdout.readline()
        assert f"http://127.0.0.1:{port}" in output
        tokens = re.findall(r"^    [^:]+: (fc_\S+)$", output, re.MULTILINE)
        assert len(tokens) == 2, output
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
        dashboard = httpx.get(
            f"{url}/api/dashboard", headers={"Authorization": f"Bearer {tokens[0]}"}
        )
        assert dashboard.status_code == 200 and dashboard.json()["products"] == 3
        assert (tmp_path / "data" / "freshcache.db").exists()
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if server.stdout is not None:
            server.stdout.close()
    assert server.returncode == 0


async def test_demo_tokens_survive_a_restart(tmp_path: Path) -> None:
    seen: list[list[DemoTenant]] = []
    settings = Settings(data_dir=tmp_path, demo=True, relay_poll_interval=0.05)
    for _ in range(2):
        app = create_app(settings, on_ready=lambda _runtime, demo: seen.append(demo))
        async with app.router.lifespan_context(app):
            pass
    assert len(seen[0]) == 2 and seen[0] == seen[1]
    app = create_app(Settings(data_dir=tmp_path / "empty", demo=False))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            assert (await client.get("/api/categories")).json() == {"categories": []}


def test_database_urls_are_normalised() -> None:
    assert normalise_database_url("postgresql://u@h:5/d") == "postgresql+asyncpg://u@h:5/d"
    assert normalise_database_url("postgresql+asyncpg://h/d") == "postgresql+asyncpg://h/d"
    assert normalise_database_url("sqlite:////tmp/x.db") == "sqlite+aiosqlite:////tmp/x.db"
    with pytest.raises(ValueError, match="FRESHCACHE_DATABASE_URL"):
        normalise_database_url("mysql://h/d")


def test_rules_that_miss_an_event_type_of_the_service_are_refused(tmp_path: Path) -> None:
    shipped = MARKETPLACE_RULES.read_text()
    without_shops = tmp_path / "rules.yaml"
    without_shops.write_text(shipped[: shipped.index("  shop.created")])
    with pytest.raises(RuleError, match=r"shop\.created"):
        Runtime(Settings(data_dir=tmp_path, rules_path=without_shops))
