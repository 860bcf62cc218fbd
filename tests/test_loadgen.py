"""``freshcache loadgen`` against a real ``freshcache serve``, the ``X-Cache`` header it
reads, and the setting that switches caching off."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from freshcache.cli import app
from freshcache.loadgen import LoadConfig, LoadgenError, Zipf, run_load
from freshcache.marketplace import Settings
from freshcache.testing import free_port
from service_cases import ADMIN_TOKEN, Deployment, running, settings_for

READS = {
    "GET /api/products/{id}",
    "GET /api/products?category&page",
    "GET /api/marketplace/search",
    "GET /api/marketplace/shops/nearby",
    "GET /api/categories",
    "GET /api/users/{id}/profile",
    "GET /api/dashboard",
}
WRITES = {
    "PATCH /api/products/{id}",
    "PUT /api/products/{id}/stock",
    "POST /api/orders",
    "PATCH /api/categories/{id}",
}


@dataclass(frozen=True)
class Served:
    url: str
    tokens: tuple[str, ...]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``freshcache serve`` (embedded, demo data: two tenants) in a process of its own."""
    directory = tmp_path_factory.mktemp("loadgen")
    port = free_port()
    environment = {
        **os.environ,
        "FRESHCACHE_DATA_DIR": str(directory / "data"),
        "FRESHCACHE_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    for variable in ("FRESHCACHE_DATABASE_URL", "FRESHCACHE_REDIS_URL", "FRESHCACHE_CACHE"):
        environment.pop(variable, None)
    command = [str(Path(sys.executable).parent / "freshcache"), "serve", "--port", str(port)]
    log = directory / "serve.log"
    # A file, not a pipe: the access log of hundreds of requests would fill a pipe nobody
    # reads and stall the server.
    with log.open("wb") as output:
        server = subprocess.Popen(
            command, env=environment, cwd=directory, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while "Application startup complete" not in log.read_text():
            assert time.monotonic() < deadline and server.poll() is None, log.read_text()
            time.sleep(0.05)
        tokens = re.findall(r"^    [^:]+: (fc_\S+)$", log.read_text(), re.MULTILINE)
        assert len(tokens) == 2, log.read_text()
        yield Served(f"http://127.0.0.1:{port}", tuple(tokens))
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


async def test_loadgen_sends_the_mix_and_counts_every_request(served: Served) -> None:
    config = LoadConfig(
        url=served.url,
        tokens=served.tokens,
        admin_token=ADMIN_TOKEN,
        requests=400,
        warmup=50,
        concurrency=8,
        write_ratio=0.2,
        seed=3,
    )
    report = await run_load(config)
    figures = report.figures()

    assert figures["requests"] == 400
    assert figures["errors"] == 0, report.error_samples
    endpoints = figures["endpoints"]
    assert sum(row["requests"] for row in endpoints.values()) == 400
    assert READS <= set(endpoints) <= READS | WRITES
    assert sum(endpoints[name]["requests"] for name in WRITES & set(endpoints)) > 0
    for name in READS:
        row = endpoints[name]
        assert 0 <= row["hit_ratio"] <= 1, name
        assert row["p50_ms_cached"] is None or row["p50_ms_cached"] <= row["p99_ms_cached"]
    # Five demo products, read over and over: most reads must be served from the cache.
    assert 0.3 < figures["hit_ratio"] <= 1
    assert endpoints["GET /api/products/{id}"]["p50_ms_cached"] is not None
    assert figures["requests_per_second"] > 0
    for name in WRITES & set(endpoints):
        assert endpoints[name]["hit_ratio"] is None  # writes carry no X-Cache


def test_loadgen_command_prints_the_table_and_the_figures(served: Served) -> None:
    arguments = ["loadgen", "--url", served.url, "--requests", "150", "--concurrency", "4"]
    arguments += [f"--token={token}" for token in served.tokens]
    result = CliRunner().invoke(app, [*arguments, "--json"], env={"NO_COLOR": "1"})

    assert result.exit_code == 0, result.output
    assert "hit ratio" in result.output and "GET /api/products/{id}" in result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    assert figures["requests"] == 150 and figures["errors"] == 0


async def test_loadgen_names_a_token_the_service_refuses(served: Served) -> None:
    with pytest.raises(LoadgenError, match="401"):
        await run_load(LoadConfig(url=served.url, tokens=("fc_not_a_key",), requests=10))


async def test_x_cache_tells_cache_hits_from_loads(tmp_path: Path) -> None:
    async with running(settings_for(tmp_path)) as instance:
        deployment = Deployment("embedded", instance, instance)
        client = instance.client
        tenant = await deployment.tenant()
        product = await deployment.product(tenant, await deployment.category(), name="Lamp")
        path = f"/api/products/{product}"

        results = [(await client.get(path, headers=tenant)).headers["x-cache"] for _ in "ab"]
        assert results == ["miss", "hit"]
        await client.patch(path, json={"price": 3}, headers=tenant)
        after = await client.get(path, headers=tenant)
        assert (after.headers["x-cache"], after.json()["price"]) == ("miss", 3)
        with_stock = await client.get(f"{path}?include=stock", headers=tenant)
        assert with_stock.headers["x-cache"] == "hit"  # the cached base record
        search = "/api/marketplace/search?q=lamp"
        assert [(await client.get(search)).headers["x-cache"] for _ in "ab"] == ["miss", "hit"]

        # Live data, writes and errors never read through the cache: no header.
        for response in (
            await client.get(f"{path}/stock", headers=tenant),
            await client.put(f"{path}/stock", json={"stock": 2}, headers=tenant),
            await client.get("/api/products/missing", headers=tenant),
            await client.get("/healthz"),
        ):
            assert "x-cache" not in response.headers, response.request.url


async def test_caching_switched_off_loads_every_read(tmp_path: Path) -> None:
    async with running(settings_for(tmp_path, cache_enabled=False)) as instance:
        deployment = Deployment("embedded", instance, instance)
        tenant = await deployment.tenant()
        product = await deployment.product(tenant, await deployment.category(), price=4)
        path = f"/api/products/{product}"
        reads = [await instance.client.get(path, headers=tenant) for _ in range(3)]
        assert [read.headers["x-cache"] for read in reads] == ["miss"] * 3
        assert {read.json()["price"] for read in reads} == {4}
        assert instance.runtime.cache.stats.as_dict()["loads"] == 0


def test_the_cache_switch_comes_from_the_environment() -> None:
    assert Settings.from_env({}).cache_enabled
    assert Settings.from_env({"FRESHCACHE_CACHE": "on"}).cache_enabled
    assert not Settings.from_env({"FRESHCACHE_CACHE": "OFF"}).cache_enabled
    assert not Settings.from_env({"FRESHCACHE_CACHE": "0"}).cache_enabled
    with pytest.raises(ValueError, match="FRESHCACHE_CACHE"):
        Settings.from_env({"FRESHCACHE_CACHE": "of"})


def test_zipf_favours_the_first_ranks() -> None:
    zipf = Zipf(100, 1.0, random.Random(1))
    counts = Counter(zipf.rank() for _ in range(20_000))
    assert set(counts) <= set(range(100))
    # P(rank 0) = 1 / H(100) ~ 0.19; P(rank 99) ~ 0.002.
    assert 0.17 < counts[0] / 20_000 < 0.21
    assert counts[0] > counts[1] > counts[9] > counts[99]
