"""Dashboard analytics: every tenant's figures pre-computed in the background.

The specification's smart refresh strategy for dashboards: a background job computes each
tenant's figures (orders and revenue today, by hour; top products; low stock) every
``analytics_interval`` seconds and stores them under ``dashboard:{tenantId}``, the key
``GET /api/dashboard`` reads (short tier: 5 minutes, then stale-while-revalidate), so a
dashboard read is a cache hit. The real-time stream overlays the critical events (new
orders, stock alerts) on these cached figures in the browser, and each pre-computation is
pushed on the tenant's stream as a ``dashboard`` event.

One job runs per interval across the whole deployment. Intervals are slots of wall-clock
time (``floor(now / interval)``); at each slot every instance tries to take the job:

- production (Redis): a lock, ``SET key token NX PX lease`` with a random token, taken
  for the job's duration and released by compare-and-delete (a Lua script: only the
  holder's token deletes it), and under the lock a marker of the last slot that ran, so
  an instance that comes late in the slot finds it done;
- embedded default: one instance is the whole deployment, so a slot counter in the
  process is enough.

A slot whose job fails is not retried: the next slot computes fresh figures anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from sqlalchemy import func, select

from freshcache.marketplace.records import price, timestamp
from freshcache.marketplace.routes.reports import LOW_STOCK
from freshcache.marketplace.schema import order_items, orders, product_stock, products, tenants
from freshcache.stores.base import StoreUnavailable
from freshcache.stores.redis import RedisStore, unavailable_on_connection_errors

if TYPE_CHECKING:
    from freshcache.marketplace.runtime import Runtime

__all__ = [
    "AnalyticsStats",
    "DashboardAnalytics",
    "IntervalLock",
    "LocalIntervalLock",
    "PublishTenantEvent",
    "RedisIntervalLock",
    "dashboard_figures",
    "interval_lock",
]

logger = logging.getLogger(__name__)

TOP_PRODUCTS = 5
LOW_STOCK_LISTED = 10
"""The dashboard lists at most this many low-stock products, the lowest first."""
_THROUGH_IDS = 100

# Compare-and-delete: the lock is released only by the holder of its token.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


async def dashboard_figures(runtime: Runtime, tenant_id: str) -> dict[str, Any]:
    """A tenant's dashboard: the fields of ``GET /api/dashboard`` (products, low_stock,
    pending_orders, orders_today, revenue_today), for the charts today's revenue and
    orders per hour (UTC), the top products and the low-stock products, and which orders
    the figures count (``orders_through``, ``orders_through_ids``)."""
    now = datetime.now(UTC)
    today = now.date()
    counted = select(
        select(func.count()).where(products.c.tenant_id == tenant_id).scalar_subquery(),
        select(func.count())
        .where(product_stock.c.tenant_id == tenant_id, product_stock.c.quantity <= LOW_STOCK)
        .scalar_subquery(),
        select(func.count())
        .where(orders.c.tenant_id == tenant_id, orders.c.status == "pending")
        .scalar_subquery(),
    )
    placed_today = select(orders.c.id, orders.c.created_at, orders.c.total_cents).where(
        orders.c.tenant_id == tenant_id, orders.c.order_date == today
    )
    sold = func.sum(order_items.c.quantity).label("sold")
    top = (
        select(order_items.c.product_id, func.max(order_items.c.name).label("name"), sold)
        .join(orders, orders.c.id == order_items.c.order_id)
        .where(orders.c.tenant_id == tenant_id, orders.c.order_date == today)
        .group_by(order_items.c.product_id)
        .order_by(sold.desc(), order_items.c.product_id)
        .limit(TOP_PRODUCTS)
    )
    low = (
        select(products.c.id, products.c.name, product_stock.c.quantity)
        .join(product_stock, product_stock.c.product_id == products.c.id)
        .where(products.c.tenant_id == tenant_id, product_stock.c.quantity <= LOW_STOCK)
        .order_by(product_stock.c.quantity, products.c.name, products.c.id)
        .limit(LOW_STOCK_LISTED)
    )
    async with runtime.database.read() as connection:
        product_count, low_count, pending = (await connection.execute(counted)).one()
        today_orders = (await connection.execute(placed_today)).all()
        top_lines = (await connection.execute(top)).all()
        low_rows = (await connection.execute(low)).all()
    revenue_by_hour = [0] * 24
    orders_by_hour = [0] * 24
    for order in today_orders:
        hour = _utc_hour(order.created_at)
        revenue_by_hour[hour] += int(order.total_cents)
        orders_by_hour[hour] += 1
    newest = max((order.created_at for order in today_orders), default=None)
    return {
        "generated_at": timestamp(now),
        "products": int(product_count or 0),
        "low_stock": int(low_count or 0),
        "pending_orders": int(pending or 0),
        "orders_today": len(today_orders),
        "revenue_today": price(sum(revenue_by_hour)),
        "orders_by_hour": orders_by_hour,
        "revenue_by_hour": [price(cents) for cents in revenue_by_hour],
        "top_products": [
            {"product_id": line.product_id, "name": line.name, "quantity": int(line.sold)}
            for line in top_lines
        ],
        "low_stock_products": [
            {"product_id": row.id, "name": row.name, "stock": int(row.quantity)} for row in low_rows
        ],
        "low_stock_threshold": LOW_STOCK,
        # What a live overlay must not count again: the orders created up to this time
        # (the database's precision, e.g. whole seconds on SQLite), and, of those created
        # at that very time, which ones.
        "orders_through": None if newest is None else timestamp(newest),
        "orders_through_ids": sorted(
            order.id for order in today_orders if order.created_at == newest
        )[:_THROUGH_IDS],
    }


def _utc_hour(moment: datetime) -> int:
    # SQLite hands back naive UTC datetimes, PostgreSQL aware ones.
    if moment.tzinfo is None:
        return moment.hour
    return moment.astimezone(UTC).hour


# -- one job per interval ------------------------------------------------------------------


class IntervalLock(ABC):
    """Lets one instance of a deployment run a job per slot of time."""

    @abstractmethod
    async def claim(self, slot: int) -> str | None:
        """A token if this instance runs ``slot``'s job (nobody has, nobody is), else
        ``None``. Hand the token to :meth:`release` once the job is over."""

    @abstractmethod
    async def release(self, token: str) -> None:
        """Let the next slot's job run (on any instance)."""


class LocalIntervalLock(IntervalLock):
    """The embedded default: this process is the whole deployment."""

    def __init__(self) -> None:
        self._last_slot: int | None = None
        self._running = False

    async def claim(self, slot: int) -> str | None:
        if self._running or (self._last_slot is not None and slot <= self._last_slot):
            return None
        self._running = True
        self._last_slot = slot
        return str(slot)

    async def release(self, token: str) -> None:
        self._running = False


class RedisIntervalLock(IntervalLock):
    """Shared by every instance through Redis: a lock held while the job runs (``lease``
    seconds at most; set it above the job's duration) and the last slot that ran."""

    def __init__(self, client: redis.Redis | RedisCluster, name: str, lease: float) -> None:
        self.client = client
        # One hash tag: both keys in one Redis Cluster slot.
        self.lock_key = f"{{{name}}}:lock"
        self.slot_key = f"{{{name}}}:last-slot"
        self.lease_ms = max(1, int(lease * 1000))
        self._release = client.register_script(_RELEASE)

    async def claim(self, slot: int) -> str | None:
        token = os.urandom(16).hex()
        with unavailable_on_connection_errors():
            if not await self.client.set(self.lock_key, token, nx=True, px=self.lease_ms):
                return None
            last = await self.client.get(self.slot_key)
            if last is not None and int(last) >= slot:
                await self._release(keys=[self.lock_key], args=[token])
                return None
            # Marked before the job runs: a job that fails is not run again in its slot.
            await self.client.set(self.slot_key, slot, px=self.lease_ms * 2)
        return token

    async def release(self, token: str) -> None:
        with unavailable_on_connection_errors():
            await self._release(keys=[self.lock_key], args=[token])


# -- the job -------------------------------------------------------------------------------


@dataclass
class AnalyticsStats:
    """What the analytics job did on this instance: the slots it ran (the last 100),
    slots another instance had (``skipped``), tenants refreshed, dashboards pushed on the
    real-time streams, and failures."""

    runs: int = 0
    skipped: int = 0
    tenants: int = 0
    pushed: int = 0
    failures: int = 0
    slots: list[int] = field(default_factory=list)


PublishTenantEvent = Callable[[str, str, dict[str, Any]], Awaitable[object]]
"""(tenant id, event, data): push an event on a tenant's live stream
(:meth:`Realtime.publish_tenant_event <freshcache.realtime.Realtime.publish_tenant_event>`)."""


class DashboardAnalytics:
    """Pre-computes every tenant's dashboard once per ``interval`` seconds across the
    deployment (see the module's documentation) and pushes it with ``publish`` (if
    given); :meth:`start` and :meth:`stop` it.

    The figures are stored fresh for a quarter more than the interval, so that between
    two runs a dashboard read (or a stream's periodic figures) is a hit on them.
    """

    def __init__(
        self,
        runtime: Runtime,
        interval: float,
        lock: IntervalLock,
        *,
        publish: PublishTenantEvent | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self.runtime = runtime
        self.interval = interval
        self.lock = lock
        self.publish = publish
        self.stats = AnalyticsStats()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="freshcache-analytics"
        )

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while not self._stopping.is_set():
            slot = int(time.time() // self.interval)
            try:
                await self.run_slot(slot)
            except Exception:
                self.stats.failures += 1
                logger.exception("dashboard analytics failed")
            delay = (slot + 1) * self.interval - time.time()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(delay, 0.0)):
                    await self._stopping.wait()

    async def run_slot(self, slot: int) -> bool:
        """Run ``slot``'s job if no instance has; whether this one did."""
        try:
            token = await self.lock.claim(slot)
        except StoreUnavailable as error:
            logger.warning("analytics lock unavailable, slot %d skipped: %s", slot, error)
            return False
        if token is None:
            self.stats.skipped += 1
            return False
        try:
            self.stats.runs += 1
            self.stats.slots = [*self.stats.slots[-99:], slot]
            await self.refresh(await self._tenant_ids())
        finally:
            with contextlib.suppress(StoreUnavailable):
                await self.lock.release(token)
        return True

    async def _tenant_ids(self) -> list[str]:
        async with self.runtime.database.read() as connection:
            return list(await connection.scalars(select(tenants.c.id).order_by(tenants.c.id)))

    async def refresh(self, tenant_ids: Sequence[str]) -> None:
        """Compute and store these tenants' dashboards now, and push them."""
        runtime = self.runtime
        template = runtime.keyspace["dashboard:{tenantId}"]
        for tenant_id in tenant_ids:
            figures = await dashboard_figures(runtime, tenant_id)
            await runtime.cache.set(template(tenantId=tenant_id), figures, ttl=self.interval * 1.25)
            self.stats.tenants += 1
            if self.publish is not None:
                await self.publish(tenant_id, "dashboard", figures)
                self.stats.pushed += 1


def interval_lock(runtime: Runtime, lease: float) -> IntervalLock:
    """The lock of the runtime's deployment: Redis when its cache is there."""
    store = runtime.cache.store
    if not isinstance(store, RedisStore):
        return LocalIntervalLock()
    name = f"{runtime.settings.key_prefix}analytics:dashboard"
    return RedisIntervalLock(store.client, name, lease)
