"""deploy/varnish/default.vcl and VarnishPurger against a real varnishd (with xkey) in front
of a real origin process (tests/helpers/origin.py)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from freshcache.pipeline.cdn import CdnPurger, VarnishPurger
from freshcache.testing import VarnishServer, free_port

ORIGIN_SCRIPT = Path(__file__).resolve().parent / "helpers" / "origin.py"


def _wait_until(
    ready: Callable[[], bool], description: str, process: subprocess.Popen[bytes]
) -> None:
    """Poll ``ready()`` for up to 20 s (a loaded machine compiles VCL slowly)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{description} exited at start with code {process.returncode}")
        try:
            if ready():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{description} did not become ready within 20 s")


def _answers_200(url: str) -> bool:
    return httpx.get(url, trust_env=False).status_code == 200


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def origin_url() -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, str(ORIGIN_SCRIPT), str(port)])
    try:
        _wait_until(lambda: _answers_200(f"{url}/__hits"), "the origin", process)
        yield url
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def varnish_url(origin_url: str) -> Iterator[str]:
    with VarnishServer(backend_port=int(origin_url.rsplit(":", 1)[1])) as varnish:
        yield varnish.url


@pytest.fixture
async def client(varnish_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=varnish_url, trust_env=False) as http:
        yield http


@pytest.fixture
async def purger(varnish_url: str) -> AsyncIterator[VarnishPurger]:
    # batch_size=2 so purges of several tags or paths take several requests.
    varnish = VarnishPurger([varnish_url], batch_size=2, retries=0)
    yield varnish
    await varnish.close()


async def origin_hits(origin_url: str, path: str) -> int:
    async with httpx.AsyncClient(trust_env=False) as http:
        counts: dict[str, int] = (await http.get(f"{origin_url}/__hits")).json()
    return counts.get(path, 0)


async def test_repeated_gets_are_served_from_the_cache(
    client: httpx.AsyncClient, origin_url: str
) -> None:
    bodies = [(await client.get("/cached/1?xkey=cached")).text for _ in range(3)]

    assert bodies == ["/cached/1 #1 "] * 3
    assert await origin_hits(origin_url, "/cached/1") == 1


async def test_purge_by_tag_removes_exactly_the_tagged_objects(
    client: httpx.AsyncClient, purger: VarnishPurger, origin_url: str
) -> None:
    pages = {
        "/tags/product-1": "?xkey=product:1+category:7",
        "/tags/product-2": "?xkey=product:2+category:7",
        "/tags/product-3": "?sk=product:3",  # Surrogate-Key only
        "/tags/product-4": "?xkey=product:4&sk=shop:9",  # both headers
    }

    async def fetch_all() -> dict[str, int]:
        for path, query in pages.items():
            await client.get(path + query)
        return {path: await origin_hits(origin_url, path) for path in pages}

    assert set((await fetch_all()).values()) == {1}
    typed: CdnPurger = purger

    await typed.purge_tags(["product:1"])
    assert await fetch_all() == {
        "/tags/product-1": 2,
        "/tags/product-2": 1,
        "/tags/product-3": 1,
        "/tags/product-4": 1,
    }

    await typed.purge_tags(["category:7", "product:3", "shop:9", "no-such-tag"])
    assert await fetch_all() == {
        "/tags/product-1": 3,
        "/tags/product-2": 2,
        "/tags/product-3": 2,
        "/tags/product-4": 2,
    }


async def test_a_tag_purge_answers_with_the_number_of_objects(
    client: httpx.AsyncClient,
) -> None:
    for path in ("/count/a", "/count/b", "/count/c"):
        await client.get(f"{path}?xkey=counted")

    response = await client.request("PURGE", "/", headers={"xkey-purge": "counted other"})

    assert response.status_code == 200
    assert response.headers["xkey-purged"] == "3"
    assert response.reason_phrase == "Purged 3 objects"


@pytest.mark.parametrize(
    "cache_control",
    ["private, max-age=300", "no-store", "public, no-cache", "public, max-age=0"],
)
async def test_uncacheable_responses_are_never_cached(
    client: httpx.AsyncClient, origin_url: str, cache_control: str
) -> None:
    path = "/uncacheable/" + re.sub(r"\W+", "-", cache_control)

    for _ in range(3):
        response = await client.get(path, params={"cc": cache_control})
        assert response.headers["cache-control"] == cache_control

    assert await origin_hits(origin_url, path) == 3


async def test_tag_headers_are_not_delivered_to_clients(client: httpx.AsyncClient) -> None:
    for _ in range(2):  # the miss and the hit
        response = await client.get("/hidden?xkey=secret:1&sk=secret:2")
        assert response.status_code == 200
        assert not {"xkey", "surrogate-key", "x-url"} & set(response.headers.keys())


async def test_vary_keeps_one_object_per_variant(
    client: httpx.AsyncClient, origin_url: str
) -> None:
    bodies = [
        (await client.get("/vary?vary=Accept-Language", headers={"Accept-Language": lang})).text
        for lang in ("en", "de", "en", "de")
    ]

    assert bodies == ["/vary #1 en", "/vary #2 de", "/vary #1 en", "/vary #2 de"]
    assert await origin_hits(origin_url, "/vary") == 2


async def test_purge_paths_bans_exact_paths_and_prefixes(
    client: httpx.AsyncClient, purger: VarnishPurger, origin_url: str
) -> None:
    paths = ["/paths/shop", "/paths/shop/1", "/paths/shop/2", "/paths/other", "/paths/a.b"]

    async def fetch_all() -> dict[str, int]:
        for path in paths:
            await client.get(path)
        await client.get("/paths/other?page=2")
        await client.get("/paths/axb")
        return {path: await origin_hits(origin_url, path) for path in [*paths, "/paths/axb"]}

    await fetch_all()
    # "/paths/shop/*" is a prefix; "/paths/other" also covers its query-string variants;
    # the "." of "/paths/a.b" is literal, not a regex wildcard.
    await purger.purge_paths(["/paths/shop/*", "/paths/other", "/paths/a.b"])

    assert await fetch_all() == {
        "/paths/shop": 1,
        "/paths/shop/1": 2,
        "/paths/shop/2": 2,
        "/paths/other": 4,  # the plain URL and its ?page=2 variant were both banned
        "/paths/a.b": 2,
        "/paths/axb": 1,
    }


async def test_purge_of_a_single_url(client: httpx.AsyncClient, origin_url: str) -> None:
    await client.get("/single/1")
    await client.get("/single/2")

    response = await client.request("PURGE", "/single/1")
    await client.get("/single/1")
    await client.get("/single/2")

    assert response.status_code == 200
    assert await origin_hits(origin_url, "/single/1") == 2
    assert await origin_hits(origin_url, "/single/2") == 1


async def test_soft_purge_serves_stale_within_grace_while_refetching(
    client: httpx.AsyncClient, varnish_url: str, origin_url: str
) -> None:
    await client.get("/soft/graced?xkey=soft-graced")
    soft = VarnishPurger([varnish_url], soft=True)
    await soft.purge_tags(["soft-graced"])
    await soft.close()

    # stale-while-revalidate=60 became the grace: the expired object is still served...
    stale = await client.get("/soft/graced?xkey=soft-graced")
    assert stale.text == "/soft/graced #1 "
    # ...while Varnish refetches it in the background.
    for _ in range(200):  # up to ~10 s on a loaded machine
        if await origin_hits(origin_url, "/soft/graced") == 2:
            break
        await asyncio.sleep(0.05)
    fresh = await client.get("/soft/graced?xkey=soft-graced")
    assert fresh.text == "/soft/graced #2 "


async def test_soft_purge_without_stale_while_revalidate_refetches_at_once(
    client: httpx.AsyncClient, varnish_url: str
) -> None:
    url = "/soft/strict?xkey=soft-strict&cc=public,max-age=300"
    await client.get(url)
    soft = VarnishPurger([varnish_url], soft=True)
    await soft.purge_tags(["soft-strict"])
    await soft.close()

    assert (await client.get(url)).text == "/soft/strict #2 "


async def test_purges_from_outside_the_acl_are_refused(
    client: httpx.AsyncClient, varnish_url: str, origin_url: str
) -> None:
    await client.get("/acl?xkey=guarded")
    outsider = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(transport=outsider, base_url=varnish_url) as http:
        tag_purge = await http.request("PURGE", "/", headers={"xkey-purge": "guarded"})
        url_purge = await http.request("PURGE", "/acl?xkey=guarded")
        ban = await http.request("BAN", "/", headers={"ban-url": "^/acl"})
    await client.get("/acl?xkey=guarded")

    assert [tag_purge.status_code, url_purge.status_code, ban.status_code] == [403, 403, 403]
    assert await origin_hits(origin_url, "/acl") == 1
