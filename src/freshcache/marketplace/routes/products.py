"""Products (cached base records and listing pages) and their stock (live, never cached).

The product record and the listing pages are cache-aside reads; every write applies its
event's invalidation plan before responding, so the next read sees it. Stock is the
real-time layer of the specification's hybrid approach: read from the database on every
request, ``Cache-Control: no-store``, and merged into the cached record with
``?include=stock``.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from freshcache.core.events import new_event
from freshcache.marketplace.auth import Tenant, TenantAccess, runtime_of
from freshcache.marketplace.caching import cached_read, never_cache
from freshcache.marketplace.errors import ApiError, not_found
from freshcache.marketplace.models import IdPath, IdQuery, ProductIn, ProductPatch, StockIn
from freshcache.marketplace.records import cents, product_record
from freshcache.marketplace.schema import categories, new_id, product_stock, products

__all__ = ["PAGE_SIZE", "router"]

router = APIRouter(tags=["products"])

PAGE_SIZE = 20
_MAX_PAGE = 1000


async def _require_category(connection: AsyncConnection, category_id: str) -> None:
    found = await connection.scalar(select(categories.c.id).where(categories.c.id == category_id))
    if found is None:
        raise ApiError(422, "invalid_request", f"category_id: no category {category_id!r}")


async def _product_row(connection: AsyncConnection, tenant: Tenant, product_id: str) -> Any:
    row = (
        await connection.execute(
            select(products).where(products.c.id == product_id, products.c.tenant_id == tenant.id)
        )
    ).first()
    if row is None:
        raise not_found("product", product_id)
    return row


@router.post("/api/products", status_code=201)
async def create_product(request: Request, body: ProductIn, tenant: TenantAccess) -> dict[str, Any]:
    runtime = runtime_of(request)
    product_id = new_id()
    async with runtime.database.write() as connection:
        await _require_category(connection, body.category_id)
        await connection.execute(
            insert(products).values(
                id=product_id,
                tenant_id=tenant.id,
                name=body.name,
                description=body.description,
                price_cents=cents(body.price),
                category_id=body.category_id,
                images=body.images,
            )
        )
        await connection.execute(
            insert(product_stock).values(product_id=product_id, tenant_id=tenant.id, quantity=0)
        )
        record = product_record(await _product_row(connection, tenant, product_id))
    await runtime.changed(
        new_event("product.created", tenant.id, productId=product_id, categoryId=body.category_id)
    )
    return record


@router.get("/api/products/{product_id}")
async def get_product(
    request: Request,
    product_id: IdPath,
    tenant: TenantAccess,
    include: Annotated[str | None, Query(pattern="^stock$")] = None,
) -> dict[str, Any]:
    runtime = runtime_of(request)
    key = runtime.keyspace["product:{tenantId}:{productId}"](
        tenantId=tenant.id, productId=product_id
    )

    async def load() -> dict[str, Any]:
        async with runtime.database.read() as connection:
            return product_record(await _product_row(connection, tenant, product_id))

    base = await cached_read(request, key, load, "private")
    if include is None:
        return base
    # The seed's completeProduct: the cached base merged with the live stock.
    never_cache(request)
    return {**base, "stock": await _stock(request, tenant, product_id)}


@router.patch("/api/products/{product_id}")
async def update_product(
    request: Request, product_id: IdPath, body: ProductPatch, tenant: TenantAccess
) -> dict[str, Any]:
    runtime = runtime_of(request)
    changes = body.changes()
    new_price = changes.pop("price", None)
    if isinstance(new_price, Decimal):
        changes["price_cents"] = cents(new_price)
    async with runtime.database.write() as connection:
        before = await _product_row(connection, tenant, product_id)
        if body.category_id is not None:
            await _require_category(connection, body.category_id)
        await connection.execute(
            update(products)
            .where(products.c.id == product_id, products.c.tenant_id == tenant.id)
            .values(**changes, updated_at=func.now())
        )
        after = await _product_row(connection, tenant, product_id)
    moved = {"previousCategoryId": before.category_id} if "category_id" in changes else {}
    await runtime.changed(
        new_event(
            "product.updated",
            tenant.id,
            productId=product_id,
            categoryId=after.category_id,
            **moved,
        )
    )
    return product_record(after)


@router.delete("/api/products/{product_id}", status_code=204)
async def delete_product(request: Request, product_id: IdPath, tenant: TenantAccess) -> Response:
    runtime = runtime_of(request)
    async with runtime.database.write() as connection:
        row = await _product_row(connection, tenant, product_id)
        await connection.execute(
            delete(product_stock).where(
                product_stock.c.product_id == product_id, product_stock.c.tenant_id == tenant.id
            )
        )
        await connection.execute(
            delete(products).where(products.c.id == product_id, products.c.tenant_id == tenant.id)
        )
    await runtime.changed(
        new_event("product.deleted", tenant.id, productId=product_id, categoryId=row.category_id)
    )
    return Response(status_code=204)


@router.get("/api/products")
async def list_products(
    request: Request,
    tenant: TenantAccess,
    category: IdQuery,
    page: Annotated[int, Query(ge=1, le=_MAX_PAGE)] = 1,
) -> dict[str, Any]:
    runtime = runtime_of(request)
    key = runtime.keyspace["products:{tenantId}:category:{categoryId}:page:{page}"](
        tenantId=tenant.id, categoryId=category, page=page
    )

    async def load() -> dict[str, Any]:
        query = (
            select(products)
            .where(products.c.tenant_id == tenant.id, products.c.category_id == category)
            .order_by(products.c.name, products.c.id)
            .offset((page - 1) * PAGE_SIZE)
            .limit(PAGE_SIZE + 1)
        )
        async with runtime.database.read() as connection:
            rows = (await connection.execute(query)).all()
        return {
            "category_id": category,
            "page": page,
            "page_size": PAGE_SIZE,
            "items": [product_record(row) for row in rows[:PAGE_SIZE]],
            "has_more": len(rows) > PAGE_SIZE,
        }

    return await cached_read(request, key, load, "private")


async def _stock(request: Request, tenant: Tenant, product_id: str) -> int:
    async with runtime_of(request).database.read() as connection:
        quantity = await connection.scalar(
            select(product_stock.c.quantity).where(
                product_stock.c.product_id == product_id, product_stock.c.tenant_id == tenant.id
            )
        )
    if quantity is None:
        raise not_found("product", product_id)
    return int(quantity)


@router.get("/api/products/{product_id}/stock")
async def get_stock(request: Request, product_id: IdPath, tenant: TenantAccess) -> dict[str, Any]:
    never_cache(request)
    return {"product_id": product_id, "stock": await _stock(request, tenant, product_id)}


@router.put("/api/products/{product_id}/stock")
async def set_stock(
    request: Request, product_id: IdPath, body: StockIn, tenant: TenantAccess
) -> dict[str, Any]:
    never_cache(request)
    async with runtime_of(request).database.write() as connection:
        result = await connection.execute(
            update(product_stock)
            .where(product_stock.c.product_id == product_id, product_stock.c.tenant_id == tenant.id)
            .values(quantity=body.stock)
        )
        if result.rowcount == 0:
            raise not_found("product", product_id)
    # Nothing cached holds stock (stock.changed invalidates nothing); the outbox carries
    # the change to real-time subscribers.
    return {"product_id": product_id, "stock": body.stock}
