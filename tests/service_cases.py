"""The marketplace service under test: in-process instances and what the API suite
(tests/test_service.py) needs to drive them and read their answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from freshcache.marketplace import Settings, create_app
from freshcache.marketplace.runtime import Runtime
from freshcache.pipeline.outbox import outbox_table
from freshcache.pipeline.worker import EVENTS_TOPIC

ADMIN_TOKEN = "admin-token-for-the-tests-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass
class Instance:
    app: FastAPI
    client: httpx.AsyncClient

    @property
    def runtime(self) -> Runtime:
        runtime: Runtime = self.app.state.runtime
        return runtime


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Instance]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            yield Instance(app, client)


@dataclass
class Deployment:
    """Writes through ``a``, reads through ``b`` (the same instance when embedded)."""

    name: str
    a: Instance
    b: Instance

    async def tenant(self) -> dict[str, str]:
        """A new tenant's Authorization header."""
        response = await self.a.client.post("/api/tenants", json={"name": "T"}, headers=ADMIN)
        assert response.status_code == 201, response.text
        return {"Authorization": f"Bearer {response.json()['api_key']}"}

    async def category(self, name: str = "Lamps") -> str:
        response = await self.a.client.post("/api/categories", json={"name": name}, headers=ADMIN)
        assert response.status_code == 201, response.text
        category_id: str = response.json()["id"]
        return category_id

    async def product(self, tenant: dict[str, str], category: str, **fields: Any) -> str:
        body = {"name": "Lamp", "price": 10, "category_id": category, **fields}
        response = await self.a.client.post("/api/products", json=body, headers=tenant)
        assert response.status_code == 201, response.text
        product_id: str = response.json()["id"]
        return product_id


def settings_for(data_dir: Path, **options: Any) -> Settings:
    return Settings(
        data_dir=data_dir,
        admin_token=ADMIN_TOKEN,
        demo=False,
        relay_poll_interval=0.05,
        **options,
    )


async def settle(deployment: Deployment) -> None:
    """Wait until the outbox pipeline has applied every change made so far (its late
    re-application of a write's plan would otherwise empty a cache a test just filled)."""
    deadline = time.monotonic() + 30
    for instance in (deployment.a, deployment.b):
        runtime = instance.runtime
        while True:
            async with runtime.database.read() as connection:
                unsent = await connection.scalar(
                    select(func.count()).where(outbox_table.c.sent_at.is_(None))
                )
            pending = await runtime.bus.pending(EVENTS_TOPIC, runtime.worker.group)
            if unsent == 0 and pending == 0:
                break
            assert time.monotonic() < deadline, "the pipeline did not drain"
            await asyncio.sleep(0.05)


async def tenant_id_of(deployment: Deployment, headers: dict[str, str]) -> str:
    directory = deployment.a.app.state.tenant_directory
    tenant = await directory.find(headers["Authorization"].removeprefix("Bearer "))
    assert tenant is not None
    tenant_id: str = tenant.id
    return tenant_id


def error_of(response: httpx.Response, status: int) -> str:
    """The error message of a response that must be an error of ``status``."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message"}
    message: str = error["message"]
    return message


def today() -> str:
    return datetime.now(UTC).date().isoformat()


def samples(response: httpx.Response) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def cache_requests(response: httpx.Response, endpoint: str, result: str) -> float:
    labels = frozenset({("endpoint", endpoint), ("result", result)})
    return samples(response).get(("freshcache_cache_requests_total", labels), 0.0)
