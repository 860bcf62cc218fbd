"""Tenants (created with the admin token) and their users' profiles (cached)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from freshcache.core.events import new_event
from freshcache.marketplace.auth import (
    AdminAccess,
    Tenant,
    TenantAccess,
    hash_api_key,
    new_api_key,
    runtime_of,
)
from freshcache.marketplace.caching import cached_read
from freshcache.marketplace.errors import not_found
from freshcache.marketplace.models import IdPath, TenantIn, UserIn, UserPatch
from freshcache.marketplace.records import timestamp
from freshcache.marketplace.runtime import Runtime
from freshcache.marketplace.schema import new_id, tenants, users

__all__ = ["create_tenant", "router"]

router = APIRouter(tags=["tenants"])


async def create_tenant(runtime: Runtime, name: str) -> dict[str, str]:
    """Create a tenant; the result holds its API key, which is not stored (only its hash)."""
    tenant_id, api_key = new_id(), new_api_key()
    async with runtime.database.write() as connection:
        await connection.execute(
            insert(tenants).values(id=tenant_id, name=name, api_key_hash=hash_api_key(api_key))
        )
    return {"id": tenant_id, "name": name, "api_key": api_key}


@router.post("/api/tenants", status_code=201)
async def post_tenant(request: Request, body: TenantIn, _: AdminAccess) -> dict[str, str]:
    return await create_tenant(runtime_of(request), body.name)


async def _profile(connection: AsyncConnection, tenant: Tenant, user_id: str) -> dict[str, Any]:
    row = (
        await connection.execute(
            select(users).where(users.c.id == user_id, users.c.tenant_id == tenant.id)
        )
    ).first()
    if row is None:
        raise not_found("user", user_id)
    return {
        "id": row.id,
        "name": row.name,
        "email": row.email,
        "created_at": timestamp(row.created_at),
    }


@router.post("/api/users", status_code=201)
async def create_user(request: Request, body: UserIn, tenant: TenantAccess) -> dict[str, Any]:
    user_id = new_id()
    async with runtime_of(request).database.write() as connection:
        await connection.execute(
            insert(users).values(id=user_id, tenant_id=tenant.id, name=body.name, email=body.email)
        )
        # Nothing cached can hold a user that did not exist: no invalidation needed.
        return await _profile(connection, tenant, user_id)


@router.get("/api/users/{user_id}/profile")
async def get_profile(request: Request, user_id: IdPath, tenant: TenantAccess) -> dict[str, Any]:
    runtime = runtime_of(request)
    key = runtime.keyspace["user:{tenantId}:{userId}:profile"](tenantId=tenant.id, userId=user_id)

    async def load() -> dict[str, Any]:
        async with runtime.database.read() as connection:
            return await _profile(connection, tenant, user_id)

    return await cached_read(request, key, load, "private")


@router.patch("/api/users/{user_id}/profile")
async def update_profile(
    request: Request, user_id: IdPath, body: UserPatch, tenant: TenantAccess
) -> dict[str, Any]:
    runtime = runtime_of(request)
    async with runtime.database.write() as connection:
        result = await connection.execute(
            update(users)
            .where(users.c.id == user_id, users.c.tenant_id == tenant.id)
            .values(**body.changes())
        )
        if result.rowcount == 0:
            raise not_found("user", user_id)
        profile = await _profile(connection, tenant, user_id)
    await runtime.changed(new_event("user.updated", tenant.id, userId=user_id))
    return profile
