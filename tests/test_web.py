"""freshcache.web: CachePolicy and HttpCacheMiddleware on a FastAPI app, in process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Literal

import httpx
import pytest
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.types import ASGIApp, Message, Scope

import freshcache.web
from freshcache.core.keys import commerce_keyspace
from freshcache.core.policy import tier
from freshcache.web import (
    CachePolicy,
    HttpCacheMiddleware,
    if_none_match_matches,
    set_cache_policy,
    strong_etag,
)

KEYS = commerce_keyspace()
PRODUCT = KEYS["product:{tenantId}:{productId}"](tenantId="acme", productId="p1")
LISTING = KEYS["products:{tenantId}:category:{categoryId}:page:{page}"](
    tenantId="acme", categoryId="shoes", page=1
)
PUBLIC_PRODUCT = CachePolicy.for_key(PRODUCT, "public")
TENANT_LISTING = CachePolicy.for_key(LISTING, "private", vary=("Authorization",))


def build_app(*, etag: bool = True) -> tuple[FastAPI, dict[str, str]]:
    """A small app, and the text of its ``/product`` route (a test may change it)."""
    app = FastAPI()
    app.add_middleware(HttpCacheMiddleware, etag=etag)
    bodies = {"product": "product p1 at 10 EUR"}

    @app.api_route("/product", methods=["GET", "HEAD"])
    async def product(request: Request) -> PlainTextResponse:
        set_cache_policy(request, PUBLIC_PRODUCT)
        return PlainTextResponse(bodies["product"])

    @app.get("/listing")
    async def listing(request: Request) -> dict[str, list[str]]:
        set_cache_policy(request, TENANT_LISTING)
        return {"products": ["p1", "p2"]}

    @app.get("/tier/{name}/{scope}")
    async def tiered(request: Request, name: str, scope: Literal["private", "public"]) -> str:
        set_cache_policy(request, CachePolicy(tier=tier(name), scope=scope))
        return name

    @app.get("/stock")
    async def stock(request: Request) -> dict[str, int]:
        set_cache_policy(request, CachePolicy.never())
        return {"available": 3}

    @app.get("/no-policy")
    async def no_policy() -> Response:
        return Response("as made", headers={"Cache-Control": "max-age=5", "Vary": "Cookie"})

    @app.post("/product")
    async def update_product(request: Request) -> dict[str, bool]:
        set_cache_policy(request, PUBLIC_PRODUCT)
        return {"updated": True}

    @app.get("/missing")
    async def missing(request: Request) -> None:
        set_cache_policy(request, PUBLIC_PRODUCT)
        raise HTTPException(status_code=404, headers={"Cache-Control": "no-cache"})

    @app.get("/created")
    async def created(request: Request) -> Response:
        set_cache_policy(request, PUBLIC_PRODUCT)
        return Response("made", status_code=201)

    @app.get("/own-headers")
    async def own_headers(request: Request) -> Response:
        set_cache_policy(request, TENANT_LISTING)
        return Response(
            "versioned",
            headers={
                "ETag": '"v7"',
                "Vary": "Accept-Encoding, authorization",
                "Surrogate-Key": "extra product:acme:p1",
                "Cache-Control": "max-age=1",
            },
        )

    return app, bodies


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app, _ = build_app()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://test"
    ) as http:
        yield http


def test_policies_render_the_tier_and_scope() -> None:
    assert PUBLIC_PRODUCT.tier == PRODUCT.tier
    assert PUBLIC_PRODUCT.surrogate_keys == PRODUCT.surrogate_keys
    assert TENANT_LISTING.surrogate_keys == (
        "products:acme:category:shoes:page:1",
        "category:acme:shoes",
        "products:acme",
    )
    assert CachePolicy.never().cache_control == "no-store"
    assert CachePolicy.never().tier is None


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (lambda: CachePolicy(tier=None, scope="public"), "needs a tier"),
        (lambda: CachePolicy(tier=tier("short"), scope="public", no_store=True), "never"),
        (lambda: CachePolicy(tier=tier("short"), scope="shared"), "scope"),  # type: ignore[arg-type]
        (lambda: CachePolicy(tier=tier("short"), scope="public", surrogate_keys=("a b",)), "a b"),
        (lambda: CachePolicy(tier=tier("short"), scope="public", surrogate_keys=("",)), "''"),
        (lambda: CachePolicy(tier=tier("short"), scope="public", vary=("Bad Header",)), "Vary"),
    ],
)
def test_inconsistent_policies_are_refused(policy: Callable[[], CachePolicy], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        policy()


@pytest.mark.parametrize(
    ("name", "scope", "expected"),
    [
        ("short", "public", "public, max-age=300, stale-while-revalidate=60"),
        ("medium", "private", "private, max-age=1800, stale-while-revalidate=300"),
        ("long", "public", "public, max-age=3600, stale-while-revalidate=600"),
    ],
)
async def test_cache_control_follows_the_tier_and_scope(
    client: httpx.AsyncClient, name: str, scope: str, expected: str
) -> None:
    response = await client.get(f"/tier/{name}/{scope}")

    assert response.status_code == 200
    assert response.headers["cache-control"] == expected


async def test_no_store_responses_get_no_store_and_no_validator(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/stock")

    assert response.headers["cache-control"] == "no-store"
    assert "etag" not in response.headers
    assert "surrogate-key" not in response.headers
    assert response.json() == {"available": 3}


async def test_etag_is_a_strong_hash_of_the_body() -> None:
    app, bodies = build_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        first = await http.get("/product")
        again = await http.get("/product")
        bodies["product"] = "product p1 at 12 EUR"
        changed = await http.get("/product")

    assert first.headers["etag"] == again.headers["etag"] == strong_etag(first.content)
    assert first.headers["etag"].startswith('"') and len(first.headers["etag"]) == 34
    assert changed.headers["etag"] != first.headers["etag"]
    assert changed.headers["etag"] == strong_etag(b"product p1 at 12 EUR")


async def test_a_matching_if_none_match_is_answered_304_without_content(
    client: httpx.AsyncClient,
) -> None:
    full = await client.get("/listing")
    etag = full.headers["etag"]

    response = await client.get("/listing", headers={"If-None-Match": etag})

    assert response.status_code == 304
    assert response.content == b""
    for kept in ("etag", "cache-control", "vary", "surrogate-key", "xkey"):
        assert response.headers[kept] == full.headers[kept]
    assert "content-type" not in response.headers
    assert "content-length" not in response.headers


@pytest.mark.parametrize(
    ("if_none_match", "status"),
    [
        ("*", 304),
        ('"other", {etag}', 304),
        ('"other",W/{etag} , "more"', 304),  # weak comparison
        ('"other", "more"', 200),
        ('W/"other"', 200),
        ("not-quoted", 200),
    ],
)
async def test_if_none_match_star_and_lists(
    client: httpx.AsyncClient, if_none_match: str, status: int
) -> None:
    etag = (await client.get("/product")).headers["etag"]

    response = await client.get(
        "/product", headers={"If-None-Match": if_none_match.format(etag=etag)}
    )

    assert response.status_code == status
    assert response.headers["etag"] == etag
    assert (response.text == "product p1 at 10 EUR") is (status == 200)


def test_if_none_match_parsing() -> None:
    assert if_none_match_matches('"a,b", "c"', '"a,b"')
    assert if_none_match_matches('W/"x"', 'W/"x"')
    assert not if_none_match_matches('"a"', "unquoted")
    assert not if_none_match_matches("", '"a"')


async def test_head_gets_the_same_headers_and_304(client: httpx.AsyncClient) -> None:
    get = await client.get("/product")

    head = await client.head("/product")
    conditional = await client.head("/product", headers={"If-None-Match": get.headers["etag"]})

    assert head.status_code == 200
    for name in ("etag", "cache-control", "surrogate-key"):
        assert head.headers[name] == get.headers[name]
    assert conditional.status_code == 304


async def test_post_and_errors_are_left_untouched(client: httpx.AsyncClient) -> None:
    post = await client.post("/product")
    missing = await client.get("/missing", headers={"If-None-Match": "*"})

    assert post.status_code == 200
    assert not {"cache-control", "etag", "surrogate-key", "xkey"} & set(post.headers)
    assert missing.status_code == 404
    assert missing.headers["cache-control"] == "no-cache"
    assert not {"etag", "surrogate-key", "xkey", "vary"} & set(missing.headers)


async def test_other_2xx_get_caching_headers_but_no_etag(client: httpx.AsyncClient) -> None:
    response = await client.get("/created", headers={"If-None-Match": "*"})

    assert response.status_code == 201
    assert response.headers["cache-control"] == PUBLIC_PRODUCT.cache_control
    assert "etag" not in response.headers


async def test_responses_without_a_policy_pass_through(client: httpx.AsyncClient) -> None:
    response = await client.get("/no-policy", headers={"If-None-Match": "*"})

    assert response.status_code == 200
    assert response.headers["cache-control"] == "max-age=5"
    assert response.headers["vary"] == "Cookie"
    assert not {"etag", "surrogate-key", "xkey"} & set(response.headers)


async def test_vary_and_surrogate_keys_are_merged_with_the_routes_own(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/own-headers")

    assert response.headers["cache-control"] == TENANT_LISTING.cache_control
    assert response.headers["vary"] == "Accept-Encoding, authorization"
    expected_keys = "extra product:acme:p1 " + " ".join(TENANT_LISTING.surrogate_keys)
    assert response.headers["surrogate-key"] == response.headers["xkey"] == expected_keys


async def test_surrogate_keys_are_listed_once_in_both_headers(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/product")

    # The key's name and its tag are both "product:acme:p1".
    assert PRODUCT.surrogate_keys == ("product:acme:p1", "product:acme:p1")
    assert response.headers["surrogate-key"] == "product:acme:p1"
    assert response.headers["xkey"] == "product:acme:p1"
    assert "vary" not in response.headers


async def test_vary_is_added_for_tenant_data(client: httpx.AsyncClient) -> None:
    response = await client.get("/listing")

    assert response.headers["vary"] == "Authorization"
    assert response.headers["cache-control"].startswith("private, ")


async def test_the_routes_own_etag_is_kept_and_validated(client: httpx.AsyncClient) -> None:
    plain = await client.get("/own-headers")
    weak_match = await client.get("/own-headers", headers={"If-None-Match": 'W/"v7"'})

    assert plain.headers["etag"] == '"v7"'
    assert plain.text == "versioned"
    assert weak_match.status_code == 304
    assert weak_match.content == b""


async def test_etag_false_adds_no_etag_and_never_304() -> None:
    app, _ = build_app(etag=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        response = await http.get("/product", headers={"If-None-Match": "*"})

    assert response.status_code == 200
    assert "etag" not in response.headers
    assert response.headers["cache-control"] == PUBLIC_PRODUCT.cache_control


class RawAsgiClient:
    """Drives an ASGI app the way a server does, message by message, so the test sees each
    message when the app sends it (httpx's ASGITransport collects the whole body first)."""

    def __init__(self, app: ASGIApp, path: str) -> None:
        self.sent: asyncio.Queue[Message] = asyncio.Queue()
        self.disconnected = asyncio.Event()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"test"), (b"if-none-match", b"*")],
            "client": ("127.0.0.1", 50000),
            "server": ("test", 80),
        }
        self.task = asyncio.create_task(self._serve(app, scope))

    async def _serve(self, app: ASGIApp, scope: Scope) -> None:
        await app(scope, self._receive, self.sent.put)

    async def _receive(self) -> Message:
        await self.disconnected.wait()
        return {"type": "http.disconnect"}

    async def next_message(self) -> Message:
        # A guard against a hang, not a timing assertion.
        async with asyncio.timeout(10):
            return await self.sent.get()

    async def close(self) -> None:
        self.disconnected.set()
        await self.task


async def test_streams_pass_through_unbuffered() -> None:
    app = FastAPI()
    app.add_middleware(HttpCacheMiddleware)
    # Each chunk is produced only after the client has received what came before it.
    received = [asyncio.Event(), asyncio.Event()]
    produced: list[bytes] = []

    async def chunks() -> AsyncIterator[bytes]:
        for chunk, previous_received in zip((b"chunk 1\n", b"chunk 2\n"), received, strict=True):
            await previous_received.wait()
            produced.append(chunk)
            yield chunk

    @app.get("/export")
    async def export(request: Request) -> StreamingResponse:
        set_cache_policy(request, PUBLIC_PRODUCT)
        return StreamingResponse(chunks(), media_type="text/csv")

    client = RawAsgiClient(app, "/export")
    start = await client.next_message()

    assert produced == []
    assert start["status"] == 200  # If-None-Match: * does not apply: no ETag of ours
    headers = dict(start["headers"])
    assert headers[b"cache-control"] == PUBLIC_PRODUCT.cache_control.encode()
    assert b"etag" not in headers

    received[0].set()
    first = await client.next_message()
    assert first["body"] == b"chunk 1\n" and first["more_body"]
    assert produced == [b"chunk 1\n"]

    received[1].set()
    second = await client.next_message()
    assert second["body"] == b"chunk 2\n"
    assert (await client.next_message())["more_body"] is False
    await client.close()


async def test_event_streams_start_before_their_first_event() -> None:
    app = FastAPI()
    app.add_middleware(HttpCacheMiddleware)
    headers_received = asyncio.Event()

    async def events() -> AsyncIterator[str]:
        await headers_received.wait()
        yield "data: stock 3\n\n"

    @app.get("/live")
    async def live(request: Request) -> StreamingResponse:
        set_cache_policy(request, CachePolicy.never())
        return StreamingResponse(events(), media_type="text/event-stream")

    client = RawAsgiClient(app, "/live")
    start = await client.next_message()

    assert start["type"] == "http.response.start"
    assert dict(start["headers"])[b"cache-control"] == b"no-store"
    headers_received.set()
    event = await client.next_message()
    assert event["body"] == b"data: stock 3\n\n"
    assert (await client.next_message())["more_body"] is False
    await client.close()


def test_the_public_api_is_exported() -> None:
    public = {name for name in dir(freshcache.web) if not name.startswith("_")}
    assert set(freshcache.web.__all__) == public - {"middleware", "policy"}
    for name in freshcache.web.__all__:
        assert getattr(freshcache.web, name).__doc__, f"{name} has no docstring"
