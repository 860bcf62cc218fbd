"""Orders: placed atomically against live stock, tracked by status (never cached).

Placing an order decrements each line's stock with a conditional update (``... WHERE
quantity >= :wanted``) in one transaction: if any line is short, the whole order is
rolled back and answered 409, nothing changed. Lines are locked in product id order, so
two concurrent orders cannot deadlock on PostgreSQL. Cancelling an order puts its stock
back.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from freshcache.core.events import new_event
from freshcache.marketplace.auth import Tenant, TenantAccess, runtime_of
from freshcache.marketplace.caching import never_cache
from freshcache.marketplace.errors import ApiError, conflict, not_found
from freshcache.marketplace.models import IdPath, OrderIn, OrderPatch
from freshcache.marketplace.records import iso_date, price, timestamp
from freshcache.marketplace.schema import new_id, order_items, orders, product_stock, products

__all__ = ["router"]

router = APIRouter(tags=["orders"])


async def _order_record(
    connection: AsyncConnection, tenant: Tenant, order_id: str
) -> dict[str, Any]:
    order = (
        await connection.execute(
            select(orders).where(orders.c.id == order_id, orders.c.tenant_id == tenant.id)
        )
    ).first()
    if order is None:
        raise not_found("order", order_id)
    lines = await connection.execute(
        select(order_items)
        .where(order_items.c.order_id == order_id, order_items.c.tenant_id == tenant.id)
        .order_by(order_items.c.product_id)
    )
    return {
        "id": order.id,
        "status": order.status,
        "tracking_number": order.tracking_number,
        "estimated_delivery": iso_date(order.estimated_delivery),
        "total": price(order.total_cents),
        "items": [
            {
                "product_id": line.product_id,
                "name": line.name,
                "quantity": line.quantity,
                "price": price(line.price_cents),
            }
            for line in lines
        ],
        "created_at": timestamp(order.created_at),
    }


async def _restock(connection: AsyncConnection, tenant: Tenant, order_id: str) -> None:
    lines = await connection.execute(
        select(order_items.c.product_id, order_items.c.quantity).where(
            order_items.c.order_id == order_id, order_items.c.tenant_id == tenant.id
        )
    )
    for line in lines.all():
        # A product deleted since has no stock row left to restore: nothing to do.
        await connection.execute(
            update(product_stock)
            .where(
                product_stock.c.product_id == line.product_id,
                product_stock.c.tenant_id == tenant.id,
            )
            .values(quantity=product_stock.c.quantity + line.quantity)
        )


@router.post("/api/orders", status_code=201)
async def place_order(request: Request, body: OrderIn, tenant: TenantAccess) -> dict[str, Any]:
    never_cache(request)
    runtime = runtime_of(request)
    order_id = new_id()
    async with runtime.database.write() as connection:
        lines = []
        for item in sorted(body.items, key=lambda item: item.product_id):
            product = (
                await connection.execute(
                    select(products.c.name, products.c.price_cents).where(
                        products.c.id == item.product_id, products.c.tenant_id == tenant.id
                    )
                )
            ).first()
            if product is None:
                raise not_found("product", item.product_id)
            taken = await connection.execute(
                update(product_stock)
                .where(
                    product_stock.c.product_id == item.product_id,
                    product_stock.c.tenant_id == tenant.id,
                    product_stock.c.quantity >= item.quantity,
                )
                .values(quantity=product_stock.c.quantity - item.quantity)
            )
            if taken.rowcount == 0:
                # Leaving the block with an exception rolls back every line taken so far.
                raise ApiError(
                    409,
                    "out_of_stock",
                    f"product {item.product_id!r}: fewer than {item.quantity} in stock",
                )
            lines.append(
                {
                    "order_id": order_id,
                    "product_id": item.product_id,
                    "tenant_id": tenant.id,
                    "name": product.name,
                    "quantity": item.quantity,
                    "price_cents": product.price_cents,
                }
            )
        await connection.execute(
            insert(orders).values(
                id=order_id,
                tenant_id=tenant.id,
                status="pending",
                total_cents=sum(line["price_cents"] * line["quantity"] for line in lines),
                order_date=datetime.now(UTC).date(),
            )
        )
        await connection.execute(insert(order_items), lines)
        record = await _order_record(connection, tenant, order_id)
    await runtime.changed(new_event("order.created", tenant.id, orderId=order_id))
    return record


@router.get("/api/orders/{order_id}")
async def get_order(request: Request, order_id: IdPath, tenant: TenantAccess) -> dict[str, Any]:
    never_cache(request)
    async with runtime_of(request).database.read() as connection:
        return await _order_record(connection, tenant, order_id)


@router.patch("/api/orders/{order_id}")
async def update_order(
    request: Request, order_id: IdPath, body: OrderPatch, tenant: TenantAccess
) -> dict[str, Any]:
    never_cache(request)
    runtime = runtime_of(request)
    async with runtime.database.write() as connection:
        current = await connection.scalar(
            select(orders.c.status).where(orders.c.id == order_id, orders.c.tenant_id == tenant.id)
        )
        if current is None:
            raise not_found("order", order_id)
        if "status" in body.model_fields_set and body.status != current:
            if current == "cancelled":
                raise conflict(f"order {order_id!r} is cancelled; its status cannot change")
            if body.status == "cancelled":
                await _restock(connection, tenant, order_id)
        await connection.execute(
            update(orders)
            .where(orders.c.id == order_id, orders.c.tenant_id == tenant.id)
            .values(**body.changes())
        )
        record = await _order_record(connection, tenant, order_id)
    await runtime.changed(new_event("order.updated", tenant.id, orderId=order_id))
    return record
