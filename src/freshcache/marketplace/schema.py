"""The service's tables (SQLAlchemy Core) and the changes of them that become events.

Every tenant-owned row carries ``tenant_id`` and every query filters on it: the tenant
comes from the caller's API key, so a row of another tenant is simply not found. Ids are
UUID strings made by the service (``new_id``).

Stock lives in a table of its own (``product_stock``): it is the real-time layer, it
changes with every order, and its changes must not invalidate the cached product records
(which exclude it); its events (``stock.changed``) are for real-time subscribers.

The marketplace's category taxonomy belongs to no tenant; its rows carry the owner
:data:`MARKETPLACE_OWNER` so that its events have the ``tenantId`` every event needs (no
tenant id can collide with it: tenants get UUIDs).
"""

from __future__ import annotations

import uuid

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB

from freshcache.pipeline.outbox import WatchedTable

__all__ = [
    "MARKETPLACE_OWNER",
    "WATCHED_TABLES",
    "categories",
    "metadata",
    "new_id",
    "order_items",
    "orders",
    "product_stock",
    "products",
    "shops",
    "tenants",
    "users",
]

MARKETPLACE_OWNER = "marketplace"
"""The owner (event ``tenantId``) of the marketplace-wide category taxonomy."""

ID_LENGTH = 36

metadata = MetaData()


def new_id() -> str:
    """A new row id (a UUID string)."""
    return str(uuid.uuid4())


def _id(name: str = "id", *foreign: ForeignKey) -> Column[str]:
    return Column(name, String(ID_LENGTH), *foreign, primary_key=True, default=new_id)


def _tenant() -> Column[str]:
    return Column("tenant_id", String(ID_LENGTH), ForeignKey("tenants.id"), nullable=False)


def _created() -> Column[object]:
    return Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now())


tenants = Table(
    "tenants",
    metadata,
    _id(),
    Column("name", String(200), nullable=False),
    # SHA-256 of the API key: a leaked database does not leak working keys.
    Column("api_key_hash", String(64), nullable=False, unique=True),
    _created(),
)

categories = Table(
    "categories",
    metadata,
    _id(),
    Column("owner_id", String(ID_LENGTH), nullable=False, default=MARKETPLACE_OWNER),
    Column("name", String(200), nullable=False),
    Column("parent_id", String(ID_LENGTH), ForeignKey("categories.id"), nullable=True),
    _created(),
)

shops = Table(
    "shops",
    metadata,
    _id(),
    _tenant(),
    Column("name", String(200), nullable=False),
    Column("lat", Float, nullable=False),
    Column("lng", Float, nullable=False),
    _created(),
    Index("shops_position", "lat", "lng"),
)

products = Table(
    "products",
    metadata,
    _id(),
    _tenant(),
    Column("name", String(200), nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("price_cents", BigInteger, nullable=False),
    Column("category_id", String(ID_LENGTH), ForeignKey("categories.id"), nullable=False),
    # JSONB on PostgreSQL: plain json has no equality, which the outbox trigger's
    # "did it change" test needs.
    Column("images", JSON().with_variant(JSONB(), "postgresql"), nullable=False, default=list),
    _created(),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("products_listing", "tenant_id", "category_id", "name"),
)

product_stock = Table(
    "product_stock",
    metadata,
    Column("product_id", String(ID_LENGTH), ForeignKey("products.id"), primary_key=True),
    _tenant(),
    Column("quantity", Integer, nullable=False, default=0),
)

users = Table(
    "users",
    metadata,
    _id(),
    _tenant(),
    Column("name", String(200), nullable=False),
    Column("email", String(320), nullable=False),
    _created(),
)

orders = Table(
    "orders",
    metadata,
    _id(),
    _tenant(),
    Column("status", String(20), nullable=False, default="pending"),
    Column("tracking_number", String(100), nullable=True),
    Column("estimated_delivery", Date, nullable=True),
    Column("total_cents", BigInteger, nullable=False),
    # The day the order counts for in the daily reports (UTC), set by the service.
    Column("order_date", Date, nullable=False),
    _created(),
    Index("orders_by_day", "tenant_id", "order_date"),
)

order_items = Table(
    "order_items",
    metadata,
    Column("order_id", String(ID_LENGTH), ForeignKey("orders.id"), primary_key=True),
    # No foreign key: an order keeps its lines (name and price as sold) after the
    # product is deleted.
    Column("product_id", String(ID_LENGTH), primary_key=True),
    Column("tenant_id", String(ID_LENGTH), nullable=False),
    Column("name", String(200), nullable=False),
    Column("quantity", Integer, nullable=False),
    Column("price_cents", BigInteger, nullable=False),
)

WATCHED_TABLES = (
    WatchedTable(
        table="products",
        entity="product",
        tenant_column="tenant_id",
        id_columns={"id": "productId"},
        extra_columns={"category_id": "categoryId"},
        only_when_changed=("name", "description", "price_cents", "category_id", "images"),
    ),
    WatchedTable(
        table="product_stock",
        entity="stock",
        tenant_column="tenant_id",
        id_columns={"product_id": "productId"},
        value_columns={"quantity": "newStock"},
        operations={"UPDATE": "changed"},
        only_when_changed=("quantity",),
    ),
    WatchedTable(
        table="categories",
        entity="category",
        tenant_column="owner_id",
        id_columns={"id": "categoryId"},
        extra_columns={"parent_id": "parentId"},
        only_when_changed=("name", "parent_id"),
    ),
    WatchedTable(
        table="shops",
        entity="shop",
        tenant_column="tenant_id",
        id_columns={"id": "shopId"},
        only_when_changed=("name", "lat", "lng"),
    ),
    WatchedTable(
        table="orders",
        entity="order",
        tenant_column="tenant_id",
        id_columns={"id": "orderId"},
        operations={"INSERT": "created", "UPDATE": "updated"},
    ),
    WatchedTable(
        table="users",
        entity="user",
        tenant_column="tenant_id",
        id_columns={"id": "userId"},
        operations={"UPDATE": "updated"},
        only_when_changed=("name", "email"),
    ),
)
"""The tables whose changes become events (through the outbox triggers), whoever makes
them: the service, ``psql``, a migration. The events' types are in the rules file."""
