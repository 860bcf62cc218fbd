"""The dashboard's Server-Sent Events stream with a real HTTP client (httpx + httpx-sse)
against uvicorn, behind the HTTP caching and gzip middlewares: periodic metrics,
immediate critical events, ids and Last-Event-ID, heartbeats, tenant isolation."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware

from freshcache.realtime import MemoryHistory, Realtime
from freshcache.testing import serve_app
from freshcache.web import HttpCacheMiddleware

STREAM = "/api/dashboard/live-stream"
TOKENS = {"token-a": "tenant-a", "token-b": "tenant-b"}


class Dashboard:
    """The application side: how many times each tenant's figures were computed."""

    def __init__(self) -> None:
        self.computed: dict[str, int] = {}

    async def authenticate(self, token: str) -> str | None:
        return TOKENS.get(token)

    async def metrics(self, tenant: str) -> dict[str, Any]:
        self.computed[tenant] = self.computed.get(tenant, 0) + 1
        return {"tenant": tenant, "orders_today": 12, "computed": self.computed[tenant]}

    def realtime(self, **options: Any) -> Realtime:
        async def authorize(tenant: str, room: str) -> bool:
            return False

        async def snapshot(tenant: str, room: str) -> dict[str, Any]:
            return {}

        return Realtime(
            authenticate=self.authenticate,
            authorize=authorize,
            snapshot=snapshot,
            metrics=self.metrics,
            **options,
        )


@contextlib.asynccontextmanager
async def serve(realtime: Realtime) -> AsyncIterator[str]:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with realtime:
            yield

    # The stream must pass through both unbuffered and uncompressed.
    middleware = [Middleware(HttpCacheMiddleware), Middleware(GZipMiddleware, minimum_size=10)]
    app = Starlette(lifespan=lifespan, middleware=middleware)
    realtime.mount(app)
    async with serve_app(app) as url:
        yield url


@contextlib.asynccontextmanager
async def stream(
    url: str, token: str = "token-a", last_event_id: str | None = None
) -> AsyncIterator[tuple[httpx.Response, AsyncIterator[ServerSentEvent]]]:
    headers = {"Authorization": f"Bearer {token}", "Accept-Encoding": "gzip"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    async with (
        httpx.AsyncClient(timeout=10) as client,
        aconnect_sse(client, "GET", url + STREAM, headers=headers) as source,
    ):
        yield source.response, source.aiter_sse()


async def next_event(events: AsyncIterator[ServerSentEvent], name: str) -> ServerSentEvent:
    async with asyncio.timeout(10):
        async for event in events:
            if event.event == name:
                return event
    raise AssertionError(f"the stream ended before a {name!r} event")


async def test_metrics_at_once_and_periodically_critical_events_immediately() -> None:
    dashboard = Dashboard()
    # A long heartbeat interval here; the retry hint follows it.
    realtime = dashboard.realtime(metrics_interval=0.2, heartbeat_interval=30)
    async with serve(realtime) as url, stream(url) as (response, events):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        assert "content-encoding" not in response.headers
        assert "content-length" not in response.headers
        first = await next_event(events, "metrics")
        assert first.json() == {"tenant": "tenant-a", "orders_today": 12, "computed": 1}
        assert first.id
        second = await next_event(events, "metrics")
        assert second.json()["computed"] == 2
        offset = await realtime.publish_tenant_event("tenant-a", "newOrder", {"orderId": 31})
        await realtime.publish_tenant_event("tenant-b", "newOrder", {"orderId": 77})
        event = await next_event(events, "newOrder")
        assert event.json() == {"orderId": 31} and event.id == offset
        await realtime.publish_tenant_event("tenant-a", "lowStock", {"productId": 1, "stock": 2})
        assert (await next_event(events, "lowStock")).json() == {"productId": 1, "stock": 2}
        metrics = await next_event(events, "metrics")
        assert metrics.id > offset  # every id is the stream's position
        assert realtime.stats.sse_streams == 1


async def test_a_reconnect_with_last_event_id_gets_exactly_the_missed_events() -> None:
    dashboard = Dashboard()
    realtime = dashboard.realtime(history=MemoryHistory(max_messages=5), metrics_interval=60)
    async with serve(realtime) as url:
        async with stream(url) as (_, events):
            await next_event(events, "metrics")
            await realtime.publish_tenant_event("tenant-a", "newOrder", {"orderId": 1})
            seen = await next_event(events, "newOrder")
        missed = [
            await realtime.publish_tenant_event("tenant-a", "newOrder", {"orderId": n})
            for n in (2, 3)
        ]
        async with stream(url, last_event_id=seen.id) as (_, events):
            replayed = [await next_event(events, "newOrder") for _ in missed]
            assert [e.json()["orderId"] for e in replayed] == [2, 3]
            assert [e.id for e in replayed] == missed
            metrics = await next_event(events, "metrics")
            assert metrics.id == missed[-1]  # fresh figures, after the replay
            await realtime.publish_tenant_event("tenant-a", "newOrder", {"orderId": 4})
            assert (await next_event(events, "newOrder")).json() == {"orderId": 4}
        # Beyond the history: no replay, just fresh figures.
        for n in range(10, 20):
            await realtime.publish_tenant_event("tenant-a", "newOrder", {"orderId": n})
        async with stream(url, last_event_id=seen.id) as (_, events):
            first = await anext(aiter(events))
            assert first.event == "metrics"


async def test_heartbeats_keep_an_idle_stream_open() -> None:
    realtime = Dashboard().realtime(metrics_interval=60, heartbeat_interval=0.1)
    headers = {"Authorization": "Bearer token-a"}
    async with (
        serve(realtime) as url,
        httpx.AsyncClient(timeout=10) as client,
        client.stream("GET", url + STREAM, headers=headers) as response,
    ):
        lines: list[str] = []
        async with asyncio.timeout(10):
            async for line in response.aiter_lines():
                lines.append(line)
                if sum(line == ": heartbeat" for line in lines) == 2:
                    break
        assert lines[0].startswith("retry: ")
        assert "event: metrics" in lines


@pytest.mark.parametrize("token", [None, "nope"])
async def test_a_stream_needs_a_valid_bearer_token(token: str | None) -> None:
    realtime = Dashboard().realtime()
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with serve(realtime) as url, httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url + STREAM, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


async def test_browsers_may_pass_the_token_in_the_query() -> None:
    realtime = Dashboard().realtime()
    async with (
        serve(realtime) as url,
        httpx.AsyncClient(timeout=10) as client,
        aconnect_sse(client, "GET", f"{url}{STREAM}?access_token=token-b") as source,
    ):
        event = await next_event(source.aiter_sse(), "metrics")
        assert event.json()["tenant"] == "tenant-b"


async def test_figures_are_computed_once_per_tenant_for_all_its_streams() -> None:
    dashboard = Dashboard()
    realtime = dashboard.realtime(metrics_interval=0.2)
    async with (
        serve(realtime) as url,
        stream(url) as (_, first),
        stream(url) as (_, second),
    ):
        await next_event(first, "metrics")
        await next_event(second, "metrics")  # each stream's own first figures
        shared = [(await next_event(second, "metrics")).json()["computed"] for _ in range(2)]
        async with asyncio.timeout(10):
            while (await next_event(first, "metrics")).json()["computed"] != shared[0]:
                pass
        # The next tick is the same computation for both streams, not one each.
        assert (await next_event(first, "metrics")).json()["computed"] == shared[1]


async def test_a_stream_that_cannot_keep_up_is_ended_and_the_others_get_everything() -> None:
    realtime = Dashboard().realtime(metrics_interval=60, send_queue_limit=8)
    padding = os.urandom(12_000).hex()
    async with serve(realtime) as url, stream(url) as (_, events):
        await next_event(events, "metrics")
        host, port = url.removeprefix("http://").split(":")
        # A client with a tiny receive buffer that sends its request and never reads.
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect((host, int(port)))
        stuck.sendall(f"GET {STREAM} HTTP/1.1\r\nHost: {host}\r\n".encode()
                      + b"Authorization: Bearer token-a\r\n\r\n")  # fmt: skip
        try:
            async with asyncio.timeout(10):
                while True:
                    if realtime.stats.sse_streams == 2:
                        break
                    await asyncio.sleep(0.01)
            published = 0
            while not realtime.stats.slow_consumers and published < 2000:
                published += 1
                await realtime.publish_tenant_event(
                    "tenant-a", "newOrder", {"n": published, "pad": padding}
                )
                await asyncio.sleep(0.002)
            assert realtime.stats.slow_consumers == 1
            assert realtime.stats.disconnects == {"slow_consumer": 1}
            received = [
                (await next_event(events, "newOrder")).json()["n"] for _ in range(published)
            ]
            assert received == list(range(1, published + 1))
        finally:
            stuck.close()
