"""HttpCacheMiddleware behind a real Varnish running the shipped VCL: a FastAPI app served by
uvicorn (in a thread of the test process, on a free port), reached through a private
varnishd (freshcache.testing.VarnishServer) as a browser or a CDN client would."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Header, Request

from freshcache.core.keys import commerce_keyspace
from freshcache.pipeline.cdn import VarnishPurger
from freshcache.testing import VarnishServer, free_port, vcl_with_backend
from freshcache.web import CachePolicy, HttpCacheMiddleware, set_cache_policy

KEYS = commerce_keyspace()
PRODUCT = KEYS["product:{tenantId}:{productId}"]
TENANT = "acme"
AUTHORIZATION = {"Authorization": "Bearer acme-token"}


@dataclass
class Shop:
    """The origin application and what the tests read from it."""

    app: FastAPI
    prices: dict[str, int]
    hits: Counter[str]


def build_shop(varnish_url: str) -> Shop:
    """A tenant's products: a public marketplace page, a private tenant page, live stock,
    and an update that purges the product's surrogate keys from Varnish."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Created in the server's event loop, where the update route uses it.
        app.state.purger = VarnishPurger([varnish_url], retries=0)
        yield
        await app.state.purger.close()

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(HttpCacheMiddleware)
    shop = Shop(app=app, prices={}, hits=Counter())

    @app.get("/marketplace/products/{product_id}")
    async def public_product(request: Request, product_id: str) -> dict[str, object]:
        shop.hits[request.url.path] += 1
        key = PRODUCT(tenantId=TENANT, productId=product_id)
        set_cache_policy(request, CachePolicy.for_key(key, "public"))
        return {"id": product_id, "price": shop.prices.get(product_id, 10)}

    @app.get("/products/{product_id}")
    async def tenant_product(
        request: Request, product_id: str, authorization: str = Header()
    ) -> dict[str, object]:
        shop.hits[request.url.path] += 1
        key = PRODUCT(tenantId=TENANT, productId=product_id)
        set_cache_policy(request, CachePolicy.for_key(key, "private", vary=("Authorization",)))
        return {"id": product_id, "price": shop.prices.get(product_id, 10), "cost": 4}

    @app.get("/stock/{product_id}")
    async def stock(request: Request, product_id: str) -> dict[str, object]:
        shop.hits[request.url.path] += 1
        set_cache_policy(request, CachePolicy.never())
        return {"id": product_id, "available": 3}

    @app.put("/products/{product_id}")
    async def update_product(
        request: Request, product_id: str, price: int, authorization: str = Header()
    ) -> dict[str, object]:
        shop.prices[product_id] = price
        key = PRODUCT(tenantId=TENANT, productId=product_id)
        purger: VarnishPurger = request.app.state.purger
        await purger.purge_tags(key.surrogate_keys)
        return {"id": product_id, "price": price}

    return shop


@dataclass
class Deployment:
    varnish_url: str
    shop: Shop


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    app_port = free_port()
    with VarnishServer(backend_port=app_port) as varnish:
        shop = build_shop(varnish.url)
        config = uvicorn.Config(
            shop.app, host="127.0.0.1", port=app_port, log_level="warning", ws="none"
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="uvicorn")
        thread.start()
        try:
            deadline = time.monotonic() + 20
            while not server.started:
                if not thread.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError("uvicorn did not start within 20 s")
                time.sleep(0.02)
            yield Deployment(varnish_url=varnish.url, shop=shop)
        finally:
            server.should_exit = True
            thread.join()


@pytest.fixture
async def client(deployment: Deployment) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=deployment.varnish_url, trust_env=False) as http:
        yield http


async def test_repeated_public_reads_are_served_from_varnish(
    client: httpx.AsyncClient, deployment: Deployment
) -> None:
    responses = [await client.get("/marketplace/products/p1") for _ in range(3)]

    assert [response.json() for response in responses] == [{"id": "p1", "price": 10}] * 3
    assert [response.headers["x-cache"] for response in responses] == ["MISS", "HIT", "HIT"]
    assert deployment.shop.hits["/marketplace/products/p1"] == 1
    first = responses[0]
    assert first.headers["cache-control"] == "public, max-age=1800, stale-while-revalidate=300"
    assert first.headers["etag"] == responses[2].headers["etag"]
    # Varnish keeps the surrogate keys for itself.
    assert not {"surrogate-key", "xkey"} & set(first.headers)


async def test_private_tenant_reads_are_never_cached(
    client: httpx.AsyncClient, deployment: Deployment
) -> None:
    responses = [await client.get("/products/p2", headers=AUTHORIZATION) for _ in range(2)]

    assert [response.json()["cost"] for response in responses] == [4, 4]
    assert deployment.shop.hits["/products/p2"] == 2
    assert responses[1].headers["cache-control"].startswith("private, max-age=1800")
    assert responses[1].headers["vary"] == "Authorization"


async def test_no_store_stock_is_never_cached(
    client: httpx.AsyncClient, deployment: Deployment
) -> None:
    for _ in range(2):
        response = await client.get("/stock/p3")
        assert response.headers["cache-control"] == "no-store"

    assert deployment.shop.hits["/stock/p3"] == 2


async def test_an_update_purges_the_product_from_varnish(
    client: httpx.AsyncClient, deployment: Deployment
) -> None:
    path = "/marketplace/products/p4"
    other = "/marketplace/products/p5"
    before = [(await client.get(path)).json(), (await client.get(other)).json()]
    assert (await client.get(path)).json() == before[0] == {"id": "p4", "price": 10}
    assert deployment.shop.hits[path] == 1

    update = await client.put("/products/p4", params={"price": 12}, headers=AUTHORIZATION)
    assert update.status_code == 200

    after = await client.get(path)
    assert after.json() == {"id": "p4", "price": 12}
    assert after.headers["x-cache"] == "MISS"
    assert deployment.shop.hits[path] == 2
    assert (await client.get(path)).headers["x-cache"] == "HIT"
    # Another product's page was not purged.
    assert (await client.get(other)).headers["x-cache"] == "HIT"
    assert deployment.shop.hits[other] == 1


async def test_varnish_answers_304_for_a_matching_etag(
    client: httpx.AsyncClient, deployment: Deployment
) -> None:
    path = "/marketplace/products/p6"
    etag = (await client.get(path)).headers["etag"]

    revalidated = await client.get(path, headers={"If-None-Match": etag})
    changed = await client.get(path, headers={"If-None-Match": '"an-older-version"'})

    assert revalidated.status_code == 304
    assert revalidated.content == b""
    assert revalidated.headers["etag"] == etag
    assert changed.status_code == 200
    assert changed.json() == {"id": "p6", "price": 10}
    assert deployment.shop.hits[path] == 1


def test_the_backend_block_is_replaced_exactly_once() -> None:
    vcl = '# quotes "backend default {" in a comment\nbackend default {\n    .port = "8000";\n}\n'

    assert vcl_with_backend(vcl, "10.0.0.5", 9000) == (
        '# quotes "backend default {" in a comment\n'
        'backend default {\n    .host = "10.0.0.5";\n    .port = "9000";\n}\n'
    )
    with pytest.raises(ValueError, match="exactly one"):
        vcl_with_backend("vcl 4.1;\n", "127.0.0.1", 8000)
