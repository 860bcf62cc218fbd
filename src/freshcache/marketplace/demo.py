"""Demo data: two tenants with shops, products and users, in a small category tree.

Created once, on the first start against an empty database; the tenants' API keys are
kept in ``<data dir>/demo.json`` (the database only holds their hashes) so that every
later start can print them again.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from freshcache.marketplace.auth import hash_api_key, new_api_key
from freshcache.marketplace.runtime import Runtime
from freshcache.marketplace.schema import (
    MARKETPLACE_OWNER,
    categories,
    new_id,
    product_stock,
    products,
    shops,
    tenants,
    users,
)

__all__ = ["DemoTenant", "ensure_demo"]

# Serialises seeding across instances starting at once on one PostgreSQL database.
_DEMO_LOCK = 0x66726573686364

_CATEGORIES = {"Outdoor": ("Tents", "Backpacks"), "Coffee & Tea": ("Coffee beans", "Tea")}
_TENANTS: tuple[dict[str, Any], ...] = (
    {
        "name": "Acme Outdoor",
        "shops": [("Acme Berlin Mitte", 52.52, 13.405)],
        "products": [
            ("Trail tent 2P", "Two-person, three-season tent.", 19900, "Tents", 12),
            ("Ultralight tent 1P", "890 g, packs to a bottle.", 34900, "Tents", 3),
            ("Daypack 25L", "Light daypack with rain cover.", 7990, "Backpacks", 30),
        ],
        "users": [("Ada Lovelace", "ada@acme.example")],
    },
    {
        "name": "Bean & Leaf",
        "shops": [("Bean & Leaf Kreuzberg", 52.499, 13.418), ("Bean & Leaf Potsdam", 52.39, 13.06)],
        "products": [
            ("Espresso beans 1 kg", "Dark roast, chocolate notes.", 2450, "Coffee beans", 100),
            ("Sencha green tea 100 g", "First flush, from Shizuoka.", 890, "Tea", 50),
        ],
        "users": [("Grace Hopper", "grace@beanleaf.example")],
    },
)


@dataclass(frozen=True, slots=True)
class DemoTenant:
    """A demo tenant and its API key."""

    id: str
    name: str
    api_key: str


async def ensure_demo(runtime: Runtime) -> list[DemoTenant]:
    """The demo tenants: those recorded in ``demo.json`` if the database still has them,
    otherwise newly created if the database has no tenant at all; else none."""
    state = runtime.settings.data_dir / "demo.json"
    runtime.settings.data_dir.mkdir(parents=True, exist_ok=True)
    async with runtime.database.write() as connection:
        if not runtime.database.is_sqlite:
            await connection.execute(select(func.pg_advisory_xact_lock(_DEMO_LOCK)))
        if state.exists():
            recorded = [DemoTenant(**entry) for entry in json.loads(state.read_text())["tenants"]]
            ids = [tenant.id for tenant in recorded]
            found = await connection.scalar(
                select(func.count()).select_from(tenants).where(tenants.c.id.in_(ids))
            )
            if recorded and found == len(recorded):
                return recorded
        if await connection.scalar(select(tenants.c.id).limit(1)) is not None:
            return []  # a database in use: no demo data mixed into it
        created = await _seed(connection)
        # Written before the commit: a crash in between leaves a file naming tenants the
        # database does not have, and the next start seeds again.
        with os.fdopen(os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
            json.dump({"tenants": [asdict(tenant) for tenant in created]}, file)
    return created


async def _seed(connection: AsyncConnection) -> list[DemoTenant]:
    category_ids: dict[str, str] = {}
    for parent, children in _CATEGORIES.items():
        category_ids[parent] = new_id()
        await connection.execute(
            insert(categories).values(
                id=category_ids[parent], owner_id=MARKETPLACE_OWNER, name=parent
            )
        )
        for child in children:
            category_ids[child] = new_id()
            await connection.execute(
                insert(categories).values(
                    id=category_ids[child],
                    owner_id=MARKETPLACE_OWNER,
                    name=child,
                    parent_id=category_ids[parent],
                )
            )
    created = []
    for spec in _TENANTS:
        tenant = DemoTenant(new_id(), spec["name"], new_api_key())
        await connection.execute(
            insert(tenants).values(
                id=tenant.id, name=tenant.name, api_key_hash=hash_api_key(tenant.api_key)
            )
        )
        for name, lat, lng in spec["shops"]:
            await connection.execute(
                insert(shops).values(id=new_id(), tenant_id=tenant.id, name=name, lat=lat, lng=lng)
            )
        for name, description, price_cents, category, stock in spec["products"]:
            product_id = new_id()
            await connection.execute(
                insert(products).values(
                    id=product_id,
                    tenant_id=tenant.id,
                    name=name,
                    description=description,
                    price_cents=price_cents,
                    category_id=category_ids[category],
                    images=[],
                )
            )
            await connection.execute(
                insert(product_stock).values(
                    product_id=product_id, tenant_id=tenant.id, quantity=stock
                )
            )
        for name, email in spec["users"]:
            await connection.execute(
                insert(users).values(id=new_id(), tenant_id=tenant.id, name=name, email=email)
            )
        created.append(tenant)
    return created
