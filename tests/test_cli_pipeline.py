"""The pipeline's command line: `freshcache worker`, `invalidate` and `deadletters`,
against private PostgreSQL and Redis servers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from freshcache.cache import Cache
from freshcache.cli import app
from freshcache.core.events import new_event
from freshcache.core.keys import commerce_keyspace
from freshcache.pipeline.bus import EVENTS_TOPIC, RedisStreamBus
from freshcache.pipeline.worker import DEAD_LETTER_TOPIC
from freshcache.stores.redis import RedisStore
from freshcache.testing import PostgresServer, RedisServer

FRESHCACHE = Path(sys.executable).parent / "freshcache"
PRODUCT = commerce_keyspace()["product:{tenantId}:{productId}"]


@pytest.fixture
def redis_env(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("FRESHCACHE_REDIS_URL", redis_server.url)
    yield redis_server.url


@pytest.mark.usefixtures("redis_client")  # a flushed database
def test_invalidate_validates_and_publishes(redis_env: str) -> None:
    runner = CliRunner()
    event = new_event("product.updated", "t1", productId="p1").to_json().decode()
    published = runner.invoke(app, ["invalidate", event])
    assert published.exit_code == 0, published.output
    assert "published product.updated" in published.output

    async def stream_length() -> int:
        bus = RedisStreamBus(RedisStore.from_url(redis_env).client)
        length = int(await bus.client.xlen(EVENTS_TOPIC))
        await bus.close()
        return length

    assert asyncio.run(stream_length()) == 1
    refused = runner.invoke(app, ["invalidate", '{"eventType": "product.updated"}'])
    assert refused.exit_code == 1 and "invalid event" in refused.output


@pytest.mark.usefixtures("redis_client")
def test_dead_letters_are_listed_and_replayed(redis_env: str) -> None:
    async def set_aside() -> None:
        bus = RedisStreamBus(RedisStore.from_url(redis_env).client)
        for number in range(2):
            record = (
                b'{"payload": "{\\"broken\\": %d}", "reason": "malformed event: eventId",'
                b' "topic": "freshcache:events", "messageId": "1-%d", "failedAt": 1.0}'
            ) % (number, number)
            await bus.publish(DEAD_LETTER_TOPIC, record)
        await bus.close()

    asyncio.run(set_aside())
    runner = CliRunner()
    listed = runner.invoke(app, ["deadletters", "list"])
    assert listed.exit_code == 0, listed.output
    assert listed.output.count("malformed event: eventId") == 2
    replayed = runner.invoke(app, ["deadletters", "replay", "--count", "1"])
    assert replayed.output.strip() == "replayed 1 dead letters"
    assert runner.invoke(app, ["deadletters", "list"]).output.count("malformed event") == 1


def test_pipeline_commands_need_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FRESHCACHE_REDIS_URL", raising=False)
    result = CliRunner().invoke(app, ["deadletters", "list"])
    assert result.exit_code == 2 and "FRESHCACHE_REDIS_URL" in result.output


@pytest.mark.usefixtures("redis_client")  # a flushed database: no events of other tests
def test_a_worker_process_applies_published_events(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    key = PRODUCT(tenantId="t1", productId="p1")

    async def cache_value() -> None:
        async with Cache(RedisStore.from_url(redis_server.url)) as cache:
            await cache.set(key, "cached")

    with PostgresServer() as postgres:
        environment = {
            **os.environ,
            "FRESHCACHE_DATABASE_URL": postgres.url,
            "FRESHCACHE_REDIS_URL": redis_server.url,
            "FRESHCACHE_DATA_DIR": str(tmp_path),
            "FRESHCACHE_KEY_PREFIX": "fc:",
        }
        worker = subprocess.Popen(
            [str(FRESHCACHE), "worker"],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert worker.stdout is not None
            started = ""
            while "running" not in started:  # log lines may come first
                line = worker.stdout.readline()
                assert line, f"the worker exited: {started}"
                started += line
            asyncio.run(cache_value())
            event = new_event("product.updated", "t1", productId="p1").to_json().decode()
            subprocess.run(
                [str(FRESHCACHE), "invalidate", event], env=environment, check=True, timeout=30
            )

            async def gone() -> bool:
                store = RedisStore.from_url(redis_server.url)
                deadline = time.monotonic() + 20
                try:
                    while time.monotonic() < deadline:
                        if await store.read(key) is None:
                            return True
                        await asyncio.sleep(0.05)
                    return False
                finally:
                    await store.close()

            assert asyncio.run(gone()), "the worker did not apply the event"
        finally:
            worker.terminate()
            worker.communicate(timeout=20)
