"""Socket.IO rooms with real clients: the JavaScript socket.io-client v4 (node processes
driven by tests/js/driver.mjs), raw WebSocket clients, uvicorn servers on free ports and
private Redis servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from websockets.asyncio.client import ClientConnection, connect

from freshcache.realtime import LIVE_SCRIPT, SLOW_CONSUMER, MemoryHistory, Realtime, RedisHistory
from freshcache.stores.base import StoreUnavailable
from freshcache.testing import RedisServer, serve_app

JS = Path(__file__).resolve().parent / "js"


@pytest.fixture(scope="session")
def node_driver() -> Path:
    """tests/js/driver.mjs, with socket.io-client installed beside it (npm, once)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise RuntimeError("node and npm are needed: apt-get install -y nodejs npm")
    if not (JS / "node_modules" / "socket.io-client" / "package.json").exists():
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--no-package-lock"],
            cwd=JS,
            check=True,
            timeout=300,
        )
    return JS / "driver.mjs"


class Shop:
    """The application side: tokens, which tenant owns which room, current stock."""

    def __init__(self) -> None:
        self.tokens = {"token-a": "tenant-a", "token-b": "tenant-b"}
        self.owners = {"product:1": "tenant-a", "product:2": "tenant-a", "order:7": "tenant-a"}
        self.stock: dict[str, int] = {"product:1": 5, "product:2": 8}

    async def authenticate(self, token: str) -> str | None:
        return self.tokens.get(token)

    async def authorize(self, tenant: str, room: str) -> bool:
        return self.owners.get(room, "tenant-b") == tenant

    async def snapshot(self, tenant: str, room: str) -> dict[str, Any]:
        identifier = room.partition(":")[2]
        return {"productId": identifier, "newStock": self.stock.get(room, 0), "timestamp": 0}

    def realtime(self, **options: Any) -> Realtime:
        return Realtime(
            authenticate=self.authenticate,
            authorize=self.authorize,
            snapshot=self.snapshot,
            **options,
        )

    async def set_stock(self, realtime: Realtime, product: int, stock: int) -> str:
        self.stock[f"product:{product}"] = stock
        return await realtime.publish_stock_update("tenant-a", product, stock)


@contextlib.asynccontextmanager
async def serve(realtime: Realtime, *routes: BaseRoute) -> AsyncIterator[str]:
    """A uvicorn server (in this event loop) for an app with ``realtime`` mounted."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with realtime:
            yield

    app = Starlette(routes=list(routes), lifespan=lifespan)
    realtime.mount(app)
    async with serve_app(app) as url:
        yield url


class NodeClient:
    """One node process running socket.io-client, and everything it reported."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.reports: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())
        self._acks = 0

    @classmethod
    async def start(cls, driver: Path, url: str) -> NodeClient:
        process = await asyncio.create_subprocess_exec(
            "node",
            str(driver),
            url,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "FRESHCACHE_LIVE_JS": str(LIVE_SCRIPT)},
        )
        return cls(process)

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            self.reports.append(json.loads(line))
            self._changed.set()

    async def send(self, **command: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()

    async def wait_for(self, found: Callable[[list[dict[str, Any]]], Any]) -> Any:
        """Wait (up to 15 s) until ``found(reports)`` is truthy; return it."""
        async with asyncio.timeout(15):
            while not (result := found(self.reports)):
                self._changed.clear()
                await self._changed.wait()
        return result

    async def connect(self, token: str | None, **options: Any) -> dict[str, Any]:
        start = len(self.reports)
        await self.send(op="connect", token=token, options={"transports": ["websocket"], **options})
        report: dict[str, Any] = await self.wait_for(
            lambda r: next(
                (x for x in r[start:] if x["type"] in ("connect", "connect_error")), None
            )
        )
        return report

    async def emit(self, event: str, data: Any) -> Any:
        self._acks += 1
        ack_id = self._acks
        await self.send(op="emit", event=event, data=data, id=ack_id)
        report = await self.wait_for(
            lambda r: next((x for x in r if x["type"] == "ack" and x["id"] == ack_id), None)
        )
        return report["args"][0]

    def events(self, name: str = "stockUpdate") -> list[list[Any]]:
        return [x["args"] for x in self.reports if x["type"] == "event" and x["event"] == name]

    async def wait_for_events(self, count: int, name: str = "stockUpdate") -> list[list[Any]]:
        events: list[list[Any]] = await self.wait_for(
            lambda r: len(self.events(name)) >= count and self.events(name)
        )
        return events

    async def close(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self.send(op="exit")
        try:
            async with asyncio.timeout(5):
                await self.process.wait()
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def node_client(driver: Path, url: str) -> AsyncIterator[NodeClient]:
    client = await NodeClient.start(driver, url)
    try:
        yield client
    finally:
        await client.close()


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait (up to 10 s) until ``condition()`` holds."""
    async with asyncio.timeout(10):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


def stocks(events: list[list[Any]]) -> list[int]:
    return [payload["newStock"] for payload, _meta in events]


# -- one instance -----------------------------------------------------------------------


async def test_a_subscriber_gets_a_snapshot_then_every_stock_update(node_driver: Path) -> None:
    shop = Shop()
    realtime = shop.realtime()
    async with serve(realtime) as url, node_client(node_driver, url) as client:
        assert (await client.connect("token-a"))["type"] == "connect"
        ack = await client.emit("subscribe", {"room": "product:1"})
        assert ack["ok"] and not ack["recovered"]
        assert ack["snapshot"] == {"productId": "1", "newStock": 5, "timestamp": 0}
        offsets = [await shop.set_stock(realtime, 1, stock) for stock in (4, 3)]
        await shop.set_stock(realtime, 2, 1)  # another room: not sent
        events = await client.wait_for_events(2)
        assert stocks(events) == [4, 3]
        payload, meta = events[0]
        assert set(payload) == {"productId", "newStock", "timestamp"}
        assert payload["productId"] == 1
        assert [m["offset"] for _, m in events] == offsets
        assert all(m["room"] == "product:1" for _, m in events)
        await realtime.publish_status_update(
            "tenant-a", 7, "shipped", tracking_number="TRK123456", estimated_delivery="2024-09-22"
        )
        assert (await client.emit("subscribe", {"room": "order:7"}))["ok"]
        await realtime.publish_status_update(
            "tenant-a", 7, "delivered", tracking_number="TRK123456", estimated_delivery="2024-09-22"
        )
        [[status, meta]] = await client.wait_for_events(1, "statusUpdate")
        assert status == {
            "orderId": 7,
            "status": "delivered",
            "trackingNumber": "TRK123456",
            "estimatedDelivery": "2024-09-22",
        }
        assert meta["room"] == "order:7"
        assert len(client.events()) == 2


async def test_a_bad_or_missing_token_is_refused_with_a_message(node_driver: Path) -> None:
    realtime = Shop().realtime()
    async with serve(realtime) as url:
        for token, message in (("nope", "invalid token"), (None, "missing token")):
            async with node_client(node_driver, url) as client:
                report = await client.connect(token, reconnection=False)
                assert report == {"type": "connect_error", "message": message}
        assert realtime.stats.refused_connections == 2
        assert realtime.stats.connections == 0


async def test_rooms_are_scoped_to_the_tenant(node_driver: Path) -> None:
    shop = Shop()
    realtime = shop.realtime()
    async with (
        serve(realtime) as url,
        node_client(node_driver, url) as tenant_a,
        node_client(node_driver, url) as tenant_b,
    ):
        await tenant_a.connect("token-a")
        await tenant_b.connect("token-b")
        for room in ("product:1", "order:7"):
            assert await tenant_b.emit("subscribe", {"room": room}) == {
                "ok": False,
                "error": "forbidden",
            }
        assert (await tenant_a.emit("subscribe", {"room": "product:1"}))["ok"]
        assert (await tenant_b.emit("subscribe", {"room": "product:9"}))["ok"]
        bad_requests = ({"room": "product:1:x"}, {"room": "product:1\n"}, {"room": "cart:1"},
                        {"room": 5}, "product:1")  # fmt: skip
        for bad in bad_requests:
            assert await tenant_a.emit("subscribe", bad) == {"ok": False, "error": "invalid room"}
        await realtime.publish_stock_update("tenant-b", 1, 99)  # tenant b's own product 1
        await realtime.publish_stock_update("tenant-b", 9, 42)
        await shop.set_stock(realtime, 1, 2)
        assert stocks(await tenant_b.wait_for_events(1)) == [42]
        assert stocks(await tenant_a.wait_for_events(1)) == [2]
        await asyncio.sleep(0.1)
        assert stocks(tenant_a.events()) == [2] and stocks(tenant_b.events()) == [42]


async def test_a_reconnect_with_the_last_offset_gets_exactly_the_missed_updates(
    node_driver: Path,
) -> None:
    shop = Shop()
    realtime = shop.realtime(history=MemoryHistory(max_messages=8))
    async with serve(realtime) as url, node_client(node_driver, url) as client:
        await client.connect("token-a")
        await client.emit("subscribe", {"room": "product:1"})
        await shop.set_stock(realtime, 1, 10)
        [[_, meta]] = await client.wait_for_events(1)
        await client.send(op="disconnect")
        await client.wait_for(lambda r: r[-1]["type"] == "disconnect")
        missed = [await shop.set_stock(realtime, 1, stock) for stock in range(11, 16)]
        await client.send(op="reconnect")
        await client.wait_for(lambda r: r[-1]["type"] == "connect")
        ack = await client.emit("subscribe", {"room": "product:1", "offset": meta["offset"]})
        assert ack == {
            "ok": True,
            "room": "product:1",
            "recovered": True,
            "offset": missed[-1],
            "replayed": 5,
        }
        # The replayed updates came before the acknowledgement, in order, once.
        events = client.events()
        assert stocks(events) == [10, 11, 12, 13, 14, 15]
        assert [m["offset"] for _, m in events[1:]] == missed
        await shop.set_stock(realtime, 1, 16)
        assert stocks(await client.wait_for_events(7)) == [10, *range(11, 17)]

        # Beyond the history (8 messages): not recovered, a fresh snapshot instead.
        await client.send(op="disconnect")
        await client.wait_for(lambda r: r[-1]["type"] == "disconnect")
        for stock in range(20, 30):
            await shop.set_stock(realtime, 1, stock)
        await client.send(op="reconnect")
        await client.wait_for(lambda r: r[-1]["type"] == "connect")
        ack = await client.emit("subscribe", {"room": "product:1", "offset": missed[-1]})
        assert ack["recovered"] is False
        assert ack["snapshot"]["newStock"] == 29
        assert len(client.events()) == 7  # nothing replayed


async def test_subscribing_while_updates_flow_leaves_no_gap_and_no_duplicate(
    node_driver: Path,
) -> None:
    shop = Shop()
    realtime = shop.realtime()
    async with serve(realtime) as url, node_client(node_driver, url) as client:
        await client.connect("token-a")
        first = await shop.set_stock(realtime, 1, 0)
        published = 300

        async def publish() -> None:
            for stock in range(1, published + 1):
                await shop.set_stock(realtime, 1, stock)
                await asyncio.sleep(0.001 if stock % 10 else 0.01)

        publisher = asyncio.create_task(publish())
        await asyncio.sleep(0.05)
        ack = await client.emit("subscribe", {"room": "product:1", "offset": first})
        assert ack["recovered"]
        await publisher
        assert stocks(await client.wait_for_events(published)) == list(range(1, published + 1))
        await asyncio.sleep(0.1)
        assert len(client.events()) == published


async def test_the_browser_module_merges_the_cached_record_with_live_stock(
    node_driver: Path,
) -> None:
    shop = Shop()
    realtime = shop.realtime()

    async def cached_product(request: Request) -> Response:
        # The cached base record: its stock figure is old, the live one must win.
        return JSONResponse({"id": 1, "name": "Green tea", "price": 4.5, "stock": 50})

    route = Route("/api/products/1", cached_product)
    async with serve(realtime, route) as url, node_client(node_driver, url) as client:
        await client.send(
            op="watch_product",
            token="token-a",
            productId=1,
            url=f"{url}/api/products/1",
            options={"transports": ["websocket"]},
        )

        def views(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [x["view"] for x in reports if x["type"] == "view"]

        def latest_stock(stock: int) -> Callable[[list[dict[str, Any]]], bool]:
            return lambda r: bool(views(r)) and views(r)[-1].get("stock") == stock

        await client.wait_for(latest_stock(5))  # the snapshot, over the cached 50
        assert views(client.reports)[-1] == {"id": 1, "name": "Green tea", "price": 4.5, "stock": 5}
        await shop.set_stock(realtime, 1, 4)
        await client.wait_for(latest_stock(4))
        assert realtime.stats.connections == 1

        await client.send(op="drop")  # the network fails; socket.io-client reconnects
        await client.wait_for(lambda r: any(x["type"] == "disconnect" for x in r))
        await eventually(lambda: realtime.stats.connections == 0)
        offsets = [await shop.set_stock(realtime, 1, stock) for stock in (3, 2)]
        await client.wait_for(latest_stock(2))
        stock_seen = [view["stock"] for view in views(client.reports)]
        assert stock_seen[-2:] == [3, 2]  # replayed from the offset, not a snapshot
        last_view = [x for x in client.reports if x["type"] == "view"][-1]
        assert last_view["offset"] == offsets[-1]
        async with httpx.AsyncClient(timeout=5) as http:
            script = await http.get(f"{url}/static/freshcache-live.js")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")
        assert "export function watchProduct" in script.text


# -- slow consumers ---------------------------------------------------------------------


async def raw_subscriber(url: str, token: str, room: str) -> ClientConnection:
    """A Socket.IO client speaking Engine.IO over a raw WebSocket, whose socket has a
    small receive buffer: once it stops reading, the server's queue fills quickly."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = url.removeprefix("http://").split(":")
    sock.connect((host, int(port)))
    websocket = await connect(
        f"ws://{host}:{port}/socket.io/?EIO=4&transport=websocket",
        sock=sock,
        max_queue=4,
        compression=None,  # the padding would compress to nothing
    )
    assert str(await websocket.recv()).startswith("0")  # Engine.IO open
    await websocket.send("40" + json.dumps({"token": token}))
    assert str(await websocket.recv()).startswith("40")  # Socket.IO connected
    await websocket.send("420" + json.dumps(["subscribe", {"room": room}]))
    assert json.loads(str(await websocket.recv())[3:])[0]["ok"]  # the acknowledgement
    return websocket


async def test_a_slow_consumer_is_disconnected_and_the_others_get_everything(
    node_driver: Path,
) -> None:
    shop = Shop()
    realtime = shop.realtime(send_queue_limit=8)
    padding = "x" * 32_000
    async with serve(realtime) as url, node_client(node_driver, url) as fast:
        await fast.connect("token-a")
        await fast.emit("subscribe", {"room": "product:1"})
        slow = await raw_subscriber(url, "token-a", "product:1")  # and never reads again
        published = 0
        while not realtime.stats.slow_consumers and published < 2000:
            published += 1
            await realtime.publish(
                "tenant-a", "product:1", "stockUpdate", {"n": published, "pad": padding}
            )
            await asyncio.sleep(0.002)
        assert realtime.stats.slow_consumers == 1
        for n in range(published + 1, published + 11):
            await realtime.publish("tenant-a", "product:1", "stockUpdate", {"n": n})
            await asyncio.sleep(0.002)
        events = await fast.wait_for_events(published + 10)
        assert [payload["n"] for payload, _ in events] == list(range(1, published + 11))
        await eventually(lambda: realtime.stats.disconnects.get(SLOW_CONSUMER) == 1)
        assert realtime.stats.connections == 1  # the fast client
        # Once it reads again, the client learns why it was disconnected.
        async with asyncio.timeout(20):
            while True:
                frame = str(await slow.recv())
                if frame.startswith('42["evicted"'):
                    assert json.loads(frame[2:]) == ["evicted", {"reason": SLOW_CONSUMER}]
                    break
        await slow.close()


# -- several instances, through Redis ---------------------------------------------------


async def set_stock_when_back(shop: Shop, realtime: Realtime, stock: int) -> None:
    """Publish product 1's stock, retrying while Redis is unreachable (a worker would)."""
    async with asyncio.timeout(10):
        while True:
            try:
                await shop.set_stock(realtime, 1, stock)
                return
            except StoreUnavailable:
                await asyncio.sleep(0.05)


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    with RedisServer(appendonly=True, extra_args=("--appendfsync", "always")) as server:
        yield server


async def test_a_publish_on_one_instance_reaches_clients_of_another(
    node_driver: Path, redis_server: RedisServer
) -> None:
    shop = Shop()
    first = shop.realtime(history=RedisHistory(redis_server.url, prefix="test:two:"))
    second = shop.realtime(history=RedisHistory(redis_server.url, prefix="test:two:"))
    async with (
        serve(first) as url_a,
        serve(second) as url_b,
        node_client(node_driver, url_b) as client,
    ):
        await client.connect("token-a")
        assert (await client.emit("subscribe", {"room": "product:1"}))["ok"]
        offsets = [await shop.set_stock(first, 1, stock) for stock in (7, 6, 5)]
        events = await client.wait_for_events(3)
        assert stocks(events) == [7, 6, 5]
        assert [meta["offset"] for _, meta in events] == offsets
        assert url_a != url_b


async def test_clients_recover_everything_after_redis_restarts(
    node_driver: Path, private_redis: RedisServer
) -> None:
    shop = Shop()
    publisher = shop.realtime(redis_url=private_redis.url)
    server = shop.realtime(redis_url=private_redis.url)
    async with (
        serve(publisher),
        serve(server) as url,
        node_client(node_driver, url) as client,
    ):
        await client.connect("token-a")
        await client.emit("subscribe", {"room": "product:1"})
        published = [1, 2, 3]
        for stock in published:
            await shop.set_stock(publisher, 1, stock)
        await client.wait_for_events(3)

        private_redis.kill()
        with pytest.raises(StoreUnavailable):
            await shop.set_stock(publisher, 1, 99)
        private_redis.start()
        # Published at once, before the other instance is subscribed again: it must
        # fetch them from the history when it is.
        for stock in range(10, 20):
            await set_stock_when_back(shop, publisher, stock)
            published.append(stock)
        events = await client.wait_for_events(len(published))
        assert stocks(events) == published
        offsets = [meta["offset"] for _, meta in events]
        assert offsets == sorted(set(offsets))
        assert server.stats.resyncs >= 1
        await shop.set_stock(publisher, 1, 20)
        assert stocks(await client.wait_for_events(len(published) + 1))[-1] == 20
        assert client.events("resync") == []


async def test_a_history_lost_with_redis_is_replaced_by_a_fresh_snapshot(
    node_driver: Path,
) -> None:
    shop = Shop()
    with RedisServer() as redis_server:  # no persistence: a restart loses every history
        publisher = shop.realtime(redis_url=redis_server.url)
        server = shop.realtime(redis_url=redis_server.url)
        async with (
            serve(publisher),
            serve(server) as url,
            node_client(node_driver, url) as client,
        ):
            await client.connect("token-a")
            await client.emit("subscribe", {"room": "product:1"})
            await shop.set_stock(publisher, 1, 1)
            await client.wait_for_events(1)
            redis_server.kill()
            shop.stock["product:1"] = 9  # changed while nothing could be published
            redis_server.start()
            [[snapshot, meta]] = await client.wait_for_events(1, "resync")
            assert snapshot["newStock"] == 9 and meta["room"] == "product:1"
            await set_stock_when_back(shop, publisher, 8)
            assert stocks(await client.wait_for_events(2)) == [1, 8]
