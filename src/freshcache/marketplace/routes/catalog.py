"""The marketplace's category taxonomy (admin writes, public tree) and tenants' shops."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from freshcache.core.events import new_event
from freshcache.marketplace.auth import AdminAccess, TenantAccess, runtime_of
from freshcache.marketplace.caching import cached_read
from freshcache.marketplace.errors import ApiError, not_found
from freshcache.marketplace.models import CategoryIn, CategoryPatch, IdPath, ShopIn
from freshcache.marketplace.records import timestamp
from freshcache.marketplace.schema import MARKETPLACE_OWNER, categories, new_id, shops

__all__ = ["router"]

router = APIRouter(tags=["catalog"])


def _category_record(row: Any) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "parent_id": row.parent_id}


async def _parents(connection: AsyncConnection) -> dict[str, str | None]:
    rows = await connection.execute(select(categories.c.id, categories.c.parent_id))
    return {row.id: row.parent_id for row in rows}


async def _check_parent(
    connection: AsyncConnection, parent_id: str | None, category_id: str | None = None
) -> None:
    """The parent exists, and (when moving ``category_id``) is not inside it."""
    if parent_id is None:
        return
    parents = await _parents(connection)
    if parent_id not in parents:
        raise ApiError(422, "invalid_request", f"parent_id: no category {parent_id!r}")
    ancestor: str | None = parent_id
    while ancestor is not None:
        if ancestor == category_id:
            raise ApiError(
                422, "invalid_request", "parent_id: a category cannot be placed inside itself"
            )
        ancestor = parents.get(ancestor)


@router.post("/api/categories", status_code=201)
async def create_category(request: Request, body: CategoryIn, _: AdminAccess) -> dict[str, Any]:
    runtime = runtime_of(request)
    category_id = new_id()
    async with runtime.database.write() as connection:
        await _check_parent(connection, body.parent_id)
        await connection.execute(
            insert(categories).values(
                id=category_id, owner_id=MARKETPLACE_OWNER, name=body.name, parent_id=body.parent_id
            )
        )
    await runtime.changed(new_event("category.created", MARKETPLACE_OWNER, categoryId=category_id))
    return {"id": category_id, "name": body.name, "parent_id": body.parent_id}


@router.patch("/api/categories/{category_id}")
async def update_category(
    request: Request, category_id: IdPath, body: CategoryPatch, _: AdminAccess
) -> dict[str, Any]:
    runtime = runtime_of(request)
    changes = body.changes()
    async with runtime.database.write() as connection:
        if "parent_id" in changes:
            await _check_parent(connection, body.parent_id, category_id)
        result = await connection.execute(
            update(categories).where(categories.c.id == category_id).values(**changes)
        )
        if result.rowcount == 0:
            raise not_found("category", category_id)
        row = (
            await connection.execute(select(categories).where(categories.c.id == category_id))
        ).one()
    await runtime.changed(new_event("category.updated", MARKETPLACE_OWNER, categoryId=category_id))
    return _category_record(row)


@router.get("/api/categories")
async def category_tree(request: Request) -> dict[str, Any]:
    """The whole taxonomy as a tree (public, long tier)."""
    runtime = runtime_of(request)

    async def load() -> dict[str, Any]:
        async with runtime.database.read() as connection:
            rows = (await connection.execute(select(categories).order_by(categories.c.name))).all()
        nodes = {row.id: {**_category_record(row), "children": []} for row in rows}
        roots: list[dict[str, Any]] = []
        for row in rows:
            parent = nodes.get(row.parent_id) if row.parent_id is not None else None
            (roots if parent is None else parent["children"]).append(nodes[row.id])
        return {"categories": roots}

    key = runtime.keyspace["public:categories:hierarchy"]()
    return await cached_read(request, key, load, "public")


@router.post("/api/shops", status_code=201)
async def create_shop(request: Request, body: ShopIn, tenant: TenantAccess) -> dict[str, Any]:
    runtime = runtime_of(request)
    shop_id = new_id()
    async with runtime.database.write() as connection:
        await connection.execute(
            insert(shops).values(
                id=shop_id, tenant_id=tenant.id, name=body.name, lat=body.lat, lng=body.lng
            )
        )
        created = (
            await connection.execute(select(shops.c.created_at).where(shops.c.id == shop_id))
        ).scalar_one()
    await runtime.changed(new_event("shop.created", tenant.id, shopId=shop_id))
    return {
        "id": shop_id,
        "name": body.name,
        "lat": body.lat,
        "lng": body.lng,
        "created_at": timestamp(created),
    }
