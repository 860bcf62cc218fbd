"""The marketplace service's real-time layer with real clients: the JavaScript
socket.io-client v4 (node, tests/js/driver.mjs) and httpx-sse, against uvicorn servers
on free ports (in-process, or ``freshcache serve`` processes), on the embedded default
and on PostgreSQL + Redis with two instances."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from httpx_sse import ServerSentEvent, aconnect_sse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

import test_realtime
from freshcache.core.events import new_event
from freshcache.marketplace import Settings, create_app
from freshcache.marketplace.live import (
    ChangeMark,
    LiveSettings,
    LiveUpdates,
    MemoryTurns,
    Publish,
    RedisTurns,
    RowTurns,
)
from freshcache.marketplace.routes.reports import LOW_STOCK
from freshcache.stores.base import StoreUnavailable
from freshcache.testing import PostgresServer, RedisServer, free_port, serve_app
from service_cases import ADMIN, ADMIN_TOKEN, Deployment, Instance, settings_for, settle
from test_realtime import NodeClient, eventually, node_client, stocks

node_driver = test_realtime.node_driver  # the fixture: driver.mjs with socket.io-client

STREAM = "/api/dashboard/live-stream"


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@dataclass
class Shop:
    """A tenant of a running service: its API key, and how it changes products and orders."""

    http: httpx.AsyncClient
    api_key: str
    tenant_id: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    @classmethod
    async def open(cls, http: httpx.AsyncClient) -> Shop:
        response = await http.post("/api/tenants", json={"name": "T"}, headers=ADMIN)
        assert response.status_code == 201, response.text
        return cls(http, response.json()["api_key"], response.json()["id"])

    async def product(self, stock: int = 0) -> str:
        category = await self.http.post("/api/categories", json={"name": "C"}, headers=ADMIN)
        body = {"name": "Lamp", "price": 10, "category_id": category.json()["id"]}
        created = await self.http.post("/api/products", json=body, headers=self.headers)
        assert created.status_code == 201, created.text
        product_id: str = created.json()["id"]
        if stock:
            await self.set_stock(product_id, stock)
        return product_id

    async def set_stock(self, product_id: str, stock: int) -> None:
        response = await self.http.put(
            f"/api/products/{product_id}/stock", json={"stock": stock}, headers=self.headers
        )
        assert response.status_code == 200, response.text

    async def order(self, product_id: str, quantity: int = 1) -> str:
        body = {"items": [{"product_id": product_id, "quantity": quantity}]}
        response = await self.http.post("/api/orders", json=body, headers=self.headers)
        assert response.status_code == 201, response.text
        order_id: str = response.json()["id"]
        return order_id


@dataclass
class Service:
    app: FastAPI
    url: str
    http: httpx.AsyncClient

    @property
    def live(self) -> LiveUpdates:
        live: LiveUpdates = self.app.state.live
        return live


@contextlib.asynccontextmanager
async def serving(settings: Settings, live: LiveSettings | None = None) -> AsyncIterator[Service]:
    """The service on an in-process uvicorn server (run as ``freshcache serve`` runs it)."""
    app = create_app(settings, live=live or LiveSettings())
    async with (
        serve_app(app, ws_per_message_deflate=False) as url,
        httpx.AsyncClient(base_url=url, timeout=15) as http,
    ):
        yield Service(app, url, http)


async def stock_updates(client: NodeClient, count: int) -> list[int]:
    """The newStock of the first ``count`` stockUpdate events (waits for them)."""
    return stocks(await client.wait_for_events(count))[:count]


async def no_more_events(client: NodeClient, count: int, name: str = "stockUpdate") -> None:
    """Give a duplicate the time to arrive, then check there is none."""
    await asyncio.sleep(0.3)
    assert len(client.events(name)) == count


async def drained(service: Service) -> None:
    """Wait until the outbox pipeline has handled (and published) every change so far."""
    instance = Instance(service.app, service.http)
    await settle(Deployment("embedded", instance, instance))


async def update_stock_by_sql(database_url: str, product_id: str, stock: int) -> None:
    """Another writer (a script, psql): the service hears of it through the outbox only."""
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                text("UPDATE product_stock SET quantity = :stock WHERE product_id = :id"),
                {"stock": stock, "id": product_id},
            )
    finally:
        await engine.dispose()


# -- publishing a row's changes in order ------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def turns(
    request: pytest.FixtureRequest, redis_server: RedisServer
) -> AsyncIterator[RowTurns]:
    if request.param == "memory":
        yield MemoryTurns()
        return
    redis_turns = RedisTurns(redis_server.url, prefix=f"t{secrets.token_hex(4)}:")
    yield redis_turns
    await redis_turns.close()


async def test_a_row_never_publishes_an_older_change_after_a_newer_nor_one_twice(
    turns: RowTurns,
) -> None:
    published: list[tuple[int | None, ChangeMark | None]] = []

    def publishing(stock: int) -> Publish:
        async def publish(previous: ChangeMark | None) -> None:
            published.append((stock, previous))

        return publish

    async def failing(previous: ChangeMark | None) -> None:
        raise StoreUnavailable("redis unavailable")

    older, newer = ChangeMark(100, "e1", 5), ChangeMark(200, "e2", 4)
    assert await turns.publish("row", newer, publishing(4))
    assert not await turns.publish("row", older, publishing(5))  # overtaken
    assert not await turns.publish("row", newer, publishing(4))  # redelivered
    assert await turns.publish("another row", older, publishing(5))
    latest = ChangeMark(300, "e3", 3)
    with pytest.raises(StoreUnavailable):
        await turns.publish("row", latest, failing)
    assert await turns.publish("row", latest, publishing(3))  # the batch's retry
    assert published == [(4, None), (5, None), (3, newer)]


async def test_workers_take_turns_at_a_row(redis_server: RedisServer) -> None:
    prefix = f"t{secrets.token_hex(4)}:"
    workers = [RedisTurns(redis_server.url, prefix=prefix) for _ in range(3)]
    publishing = 0
    overlapped = False
    published: list[int] = []

    def publishing_change(change: ChangeMark) -> Publish:
        async def publish(previous: ChangeMark | None) -> None:
            nonlocal publishing, overlapped
            publishing += 1
            overlapped |= publishing > 1
            await asyncio.sleep(0.01)
            published.append(change.changed_at)
            publishing -= 1

        return publish

    changes = [ChangeMark(1000 + n, f"event-{n}") for n in range(12)]
    try:
        await asyncio.gather(
            *(workers[n % 3].publish("busy", change, publishing_change(change))
              for n, change in enumerate(changes))
        )  # fmt: skip
    finally:
        for worker in workers:
            await worker.close()
    assert not overlapped
    assert published and published == sorted(published)


# -- the embedded default ---------------------------------------------------------------


async def test_every_stock_and_order_change_reaches_the_tenants_subscribers(
    node_driver: Path, tmp_path: Path
) -> None:
    async with (
        serving(settings_for(tmp_path)) as service,
        node_client(node_driver, service.url) as client,
        node_client(node_driver, service.url) as intruder,
    ):
        shop, other = await Shop.open(service.http), await Shop.open(service.http)
        product, foreign = await shop.product(), await other.product()
        # The browser's way in: long-polling first, then the upgrade to a WebSocket.
        assert (await client.connect(shop.api_key, transports=["polling", "websocket"]))[
            "type"
        ] == "connect"
        ack = await client.emit("subscribe", {"room": f"product:{product}"})
        assert ack["ok"] and ack["recovered"] is False
        assert ack["snapshot"]["productId"] == product and ack["snapshot"]["newStock"] == 0
        refused = {"ok": False, "error": "forbidden"}
        assert await client.emit("subscribe", {"room": f"product:{foreign}"}) == refused

        await shop.set_stock(product, 7)
        assert await stock_updates(client, 1) == [7]
        [[payload, meta]] = client.events()
        assert set(payload) == {"productId", "newStock", "timestamp"}
        assert payload["productId"] == product and meta["room"] == f"product:{product}"
        order = await shop.order(product, quantity=2)
        assert await stock_updates(client, 2) == [7, 5]
        await update_stock_by_sql(service.app.state.runtime.settings.sqlalchemy_url, product, 42)
        assert await stock_updates(client, 3) == [7, 5, 42]
        # An application event dated ahead would hide the changes that follow: ignored.
        ahead = datetime.now(UTC) + timedelta(hours=1)
        event = new_event(
            "stock.changed", shop.tenant_id, productId=product, newStock=999, timestamp=ahead
        )
        posted = await service.http.post("/api/events", json=event.to_dict(), headers=shop.headers)
        assert posted.status_code == 202
        await eventually(lambda: service.live.stats.unusable == 1)
        await shop.set_stock(product, 40)
        assert await stock_updates(client, 4) == [7, 5, 42, 40]
        await no_more_events(client, 4)

        ack = await client.emit("subscribe", {"room": f"order:{order}"})
        assert ack["snapshot"] == {
            "orderId": order,
            "status": "pending",
            "trackingNumber": None,
            "estimatedDelivery": None,
        }
        shipped = {
            "status": "shipped",
            "tracking_number": "TRK123",
            "estimated_delivery": "2030-01-02",
        }
        patched = await service.http.patch(
            f"/api/orders/{order}", json=shipped, headers=shop.headers
        )
        assert patched.status_code == 200
        [[status, meta]] = await client.wait_for_events(1, "statusUpdate")
        assert status == {
            "orderId": order,
            "status": "shipped",
            "trackingNumber": "TRK123",
            "estimatedDelivery": "2030-01-02",
        }
        assert meta["room"] == f"order:{order}"

        assert (await intruder.connect(other.api_key))["type"] == "connect"
        for room in (f"product:{product}", f"order:{order}"):
            assert await intruder.emit("subscribe", {"room": room}) == refused
        assert (await intruder.connect("fc_not-a-key", reconnection=False)) == {
            "type": "connect_error",
            "message": "invalid token",
        }
        script = await service.http.get("/static/freshcache-live.js")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")


async def test_a_reconnect_gets_exactly_the_missed_updates_or_a_snapshot(
    node_driver: Path, tmp_path: Path
) -> None:
    live = LiveSettings(history=8)
    async with (
        serving(settings_for(tmp_path), live) as service,
        node_client(node_driver, service.url) as client,
    ):
        shop = await Shop.open(service.http)
        product = await shop.product()
        room = f"product:{product}"
        await client.connect(shop.api_key)
        await client.emit("subscribe", {"room": room})
        await shop.set_stock(product, 10)
        [[_, seen]] = await client.wait_for_events(1)

        async def change_while_away(stocks_set: range) -> None:
            await client.send(op="disconnect")
            await client.wait_for(lambda r: r[-1]["type"] == "disconnect")
            for stock in stocks_set:
                await shop.set_stock(product, stock)
            await drained(service)  # all published before the client is back
            await client.send(op="reconnect")
            await client.wait_for(lambda r: r[-1]["type"] == "connect")

        await change_while_away(range(11, 16))
        ack = await client.emit("subscribe", {"room": room, "offset": seen["offset"]})
        events = client.events()
        assert stocks(events) == [10, 11, 12, 13, 14, 15]  # sent before the acknowledgement
        offsets = [meta["offset"] for _, meta in events]
        assert ack == {"ok": True, "room": room, "recovered": True, "offset": offsets[-1],
                       "replayed": 5}  # fmt: skip
        await shop.set_stock(product, 16)
        assert await stock_updates(client, 7) == [10, *range(11, 17)]

        # More changes than the history keeps: a snapshot of the current stock instead.
        await change_while_away(range(20, 30))
        ack = await client.emit("subscribe", {"room": room, "offset": offsets[-1]})
        assert ack["recovered"] is False and ack["snapshot"]["newStock"] == 29
        await no_more_events(client, 7)


async def next_events(
    events: AsyncIterator[ServerSentEvent], *names: str
) -> dict[str, ServerSentEvent]:
    """The first event of each of ``names`` (whatever their order), and of the stream's
    last event under ``""``."""
    found: dict[str, ServerSentEvent] = {}
    async with asyncio.timeout(15):
        async for event in events:
            found[""] = event
            if event.event in names:
                found.setdefault(event.event, event)
            if set(names) <= set(found):
                return found
    raise AssertionError(f"the stream ended before {names}")


async def test_the_dashboard_stream_sends_figures_and_critical_events_at_once(
    tmp_path: Path,
) -> None:
    async with serving(settings_for(tmp_path), LiveSettings(interval=0.3)) as service:
        shop = await Shop.open(service.http)
        product = await shop.product(stock=LOW_STOCK + 2)
        figures = (await service.http.get("/api/dashboard", headers=shop.headers)).json()
        async with (
            httpx.AsyncClient(timeout=15) as http,
            aconnect_sse(http, "GET", service.url + STREAM, headers=shop.headers) as source,
        ):
            assert source.response.headers["content-type"].startswith("text/event-stream")
            events = source.aiter_sse()
            first = (await next_events(events, "metrics"))["metrics"]
            assert first.json() == figures and first.id  # the dashboard's cached figures
            assert (await next_events(events, "metrics"))["metrics"].json()["products"] == 1
            order = await shop.order(product, quantity=3)  # leaves LOW_STOCK - 1
            critical = await next_events(events, "newOrder", "lowStock")
            assert critical["newOrder"].json()["orderId"] == order
            assert critical["newOrder"].json()["total"] == 30
            assert critical["lowStock"].json() == {
                "productId": product,
                "newStock": LOW_STOCK - 1,
                "threshold": LOW_STOCK,
                "timestamp": critical["lowStock"].json()["timestamp"],
            }
            last_seen = critical[""].id
        missed = await shop.order(product, quantity=1)
        await drained(service)  # published while no stream was open
        resumed = {**shop.headers, "Last-Event-ID": last_seen}
        async with (
            httpx.AsyncClient(timeout=15) as http,
            aconnect_sse(http, "GET", service.url + STREAM, headers=resumed) as source,
        ):
            replayed = await next_events(source.aiter_sse(), "newOrder", "metrics")
            assert replayed["newOrder"].json()["orderId"] == missed
            # The missed events first, then fresh figures.
            assert replayed[""].event == "metrics"
        unauthorized = await service.http.get(STREAM)
        assert unauthorized.status_code == 401


# -- PostgreSQL and Redis, several instances --------------------------------------------


@contextlib.contextmanager
def serve_processes(environment: dict[str, str], count: int) -> Iterator[list[str]]:
    """``count`` ``freshcache serve`` processes; yields their URLs once all are ready."""
    command = [str(Path(sys.executable).parent / "freshcache"), "serve", "--no-demo"]
    ports = [free_port() for _ in range(count)]
    servers = [
        subprocess.Popen(
            [*command, "--port", str(port)],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for port in ports
    ]
    try:
        for server in servers:
            assert server.stdout is not None
            output = ""
            deadline = time.monotonic() + 60
            while "Application startup complete" not in output:
                assert time.monotonic() < deadline and server.poll() is None, output
                output += server.stdout.readline()
        yield [f"http://127.0.0.1:{port}" for port in ports]
    finally:
        for server in servers:
            server.send_signal(signal.SIGINT)
        for server in servers:
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            if server.stdout is not None:
                server.stdout.close()


async def test_a_change_through_one_instance_reaches_clients_of_another(
    node_driver: Path, tmp_path: Path, postgres_server: PostgresServer, redis_server: RedisServer
) -> None:
    environment = {
        **os.environ,
        "FRESHCACHE_DATABASE_URL": postgres_server.url,
        "FRESHCACHE_REDIS_URL": redis_server.url,
        "FRESHCACHE_ADMIN_TOKEN": ADMIN_TOKEN,
        "FRESHCACHE_DATA_DIR": str(tmp_path),
        # Rooms, histories and the cache of this deployment only.
        "FRESHCACHE_KEY_PREFIX": f"t{secrets.token_hex(4)}:",
    }
    with serve_processes(environment, 2) as (url_a, url_b):
        async with (
            httpx.AsyncClient(base_url=url_a, timeout=15) as http_a,
            node_client(node_driver, url_b) as client,
        ):
            shop = await Shop.open(http_a)
            product = await shop.product(stock=5)
            assert (await client.connect(shop.api_key))["type"] == "connect"
            ack = await client.emit("subscribe", {"room": f"product:{product}"})
            assert ack["snapshot"]["newStock"] == 5
            # Both instances run a worker: each change is still published once.
            await shop.set_stock(product, 9)
            assert await stock_updates(client, 1) == [9]
            await update_stock_by_sql(postgres_server.url, product, 30)
            assert await stock_updates(client, 2) == [9, 30]
            await shop.order(product, quantity=4)
            assert await stock_updates(client, 3) == [9, 30, 26]
            await no_more_events(client, 3)


async def test_clients_miss_nothing_when_redis_restarts(
    node_driver: Path, tmp_path: Path, postgres_server: PostgresServer
) -> None:
    with RedisServer(appendonly=True, extra_args=("--appendfsync", "always")) as redis_server:
        shared = settings_for(
            tmp_path, database_url=postgres_server.url, redis_url=redis_server.url
        )
        # A works the pipeline, B only serves clients: what B's clients get crossed Redis.
        async with (
            serving(shared) as a,
            serving(replace(shared, run_pipeline=False)) as b,
            node_client(node_driver, b.url) as client,
        ):
            shop = await Shop.open(a.http)
            product = await shop.product()
            await client.connect(shop.api_key)
            await client.emit("subscribe", {"room": f"product:{product}"})
            await shop.set_stock(product, 1)
            assert await stock_updates(client, 1) == [1]

            redis_server.kill()
            for stock in (2, 3, 4):  # committed; the outbox keeps them for the relay
                await shop.set_stock(product, stock)
            redis_server.start()
            for stock in (5, 6):
                await shop.set_stock(product, stock)
            await client.wait_for(lambda _: 6 in stocks(client.events()))
            await no_more_events(client, len(client.events()))
            # Nothing missing, nothing out of order. A change published just as Redis died
            # may come twice: its publish went through, but its worker never heard so.
            received = stocks(client.events())
            assert sorted(set(received)) == [1, 2, 3, 4, 5, 6] and received == sorted(received)
            offsets = [meta["offset"] for _, meta in client.events()]
            assert offsets == sorted(set(offsets))
            assert b.live.realtime.stats.resyncs >= 1  # B lost its subscription, and caught up
