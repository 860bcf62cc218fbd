"""Daily reports (long tier once the day is over, short while it runs) and the dashboard
(computed at most once per short-tier TTL, refreshed in the background after that)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from sqlalchemy import func, select

from freshcache.core.policy import tier
from freshcache.marketplace.auth import Tenant, TenantAccess, runtime_of
from freshcache.marketplace.caching import cached_read, with_tier
from freshcache.marketplace.errors import ApiError
from freshcache.marketplace.records import price, timestamp
from freshcache.marketplace.runtime import Runtime
from freshcache.marketplace.schema import order_items, orders, product_stock, products

__all__ = ["LOW_STOCK", "router"]

router = APIRouter(tags=["reports"])

LOW_STOCK = 5
"""The dashboard counts products with at most this many in stock."""
_TOP_PRODUCTS = 5


async def _day_figures(runtime: Runtime, tenant: Tenant, day: date) -> dict[str, Any]:
    """Orders placed on ``day`` (whatever happened to them since: a past day's report
    never changes, which is what lets it be cached for the long tier)."""
    placed = select(func.count(), func.coalesce(func.sum(orders.c.total_cents), 0)).where(
        orders.c.tenant_id == tenant.id, orders.c.order_date == day
    )
    sold = func.sum(order_items.c.quantity).label("sold")
    top = (
        select(order_items.c.product_id, func.max(order_items.c.name).label("name"), sold)
        .join(orders, orders.c.id == order_items.c.order_id)
        .where(orders.c.tenant_id == tenant.id, orders.c.order_date == day)
        .group_by(order_items.c.product_id)
        .order_by(sold.desc(), order_items.c.product_id)
    )
    async with runtime.database.read() as connection:
        count, revenue = (await connection.execute(placed)).one()
        lines = (await connection.execute(top)).all()
    return {
        "orders": int(count),
        "revenue": price(int(revenue)),
        "items_sold": sum(int(line.sold) for line in lines),
        "top_products": [
            {"product_id": line.product_id, "name": line.name, "quantity": int(line.sold)}
            for line in lines[:_TOP_PRODUCTS]
        ],
    }


@router.get("/api/reports/daily/{day}")
async def daily_report(
    request: Request,
    day: Annotated[date, Path(description="YYYY-MM-DD (UTC)")],
    tenant: TenantAccess,
) -> dict[str, Any]:
    runtime = runtime_of(request)
    today = datetime.now(UTC).date()
    if day > today:
        raise ApiError(422, "invalid_request", f"day: {day.isoformat()} is in the future")
    key = runtime.keyspace["reports:{tenantId}:daily:{date}"](
        tenantId=tenant.id, date=day.isoformat()
    )
    if day == today:
        key = with_tier(key, tier("short"))

    async def load() -> dict[str, Any]:
        return {"date": day.isoformat(), **await _day_figures(runtime, tenant, day)}

    return await cached_read(request, key, load, "private")


@router.get("/api/dashboard")
async def dashboard(request: Request, tenant: TenantAccess) -> dict[str, Any]:
    runtime = runtime_of(request)

    async def load() -> dict[str, Any]:
        today = datetime.now(UTC).date()
        low_stock = select(func.count()).where(
            product_stock.c.tenant_id == tenant.id, product_stock.c.quantity <= LOW_STOCK
        )
        pending = select(func.count()).where(
            orders.c.tenant_id == tenant.id, orders.c.status == "pending"
        )
        listed = select(func.count()).where(products.c.tenant_id == tenant.id)
        async with runtime.database.read() as connection:
            low = await connection.scalar(low_stock)
            pending_orders = await connection.scalar(pending)
            product_count = await connection.scalar(listed)
        figures = await _day_figures(runtime, tenant, today)
        return {
            "generated_at": timestamp(datetime.now(UTC)),
            "products": int(product_count or 0),
            "low_stock": int(low or 0),
            "pending_orders": int(pending_orders or 0),
            "orders_today": figures["orders"],
            "revenue_today": figures["revenue"],
        }

    key = runtime.keyspace["dashboard:{tenantId}"](tenantId=tenant.id)
    return await cached_read(request, key, load, "private")
