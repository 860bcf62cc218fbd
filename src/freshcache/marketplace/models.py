"""Request bodies and parameters, validated by pydantic before a route touches anything.

Unknown fields are refused (a ``tenant_id`` in a body is an error, not ignored: the
tenant comes from the API key), strings are stripped and bounded, and a ``PATCH`` body
must change something and may not set a required field to ``null``.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Annotated, ClassVar, Literal

from fastapi import Path, Query
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "CategoryIn",
    "CategoryPatch",
    "IdPath",
    "OrderIn",
    "OrderItemIn",
    "OrderPatch",
    "ProductIn",
    "ProductPatch",
    "ShopIn",
    "StockIn",
    "TenantIn",
    "UserIn",
    "UserPatch",
]

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

Id = Annotated[str, Field(pattern=ID_PATTERN, max_length=64)]
"""An entity id: the service's UUIDs, or any short id of letters, digits, ``_`` and ``-``
(what another writer, e.g. a migration, may have used); never ``*``, ``:`` or ``/``."""

IdPath = Annotated[str, Path(pattern=ID_PATTERN, max_length=64)]
"""An id in the URL; anything else is a 422 naming the parameter, before any lookup."""

IdQuery = Annotated[str, Query(pattern=ID_PATTERN, max_length=64)]

Name = Annotated[str, Field(min_length=1, max_length=200)]
Price = Annotated[Decimal, Field(ge=0, le=1_000_000_000, decimal_places=2)]
ImageUrl = Annotated[str, Field(pattern=r"^https?://\S+$", max_length=2048)]
Images = Annotated[list[ImageUrl], Field(max_length=20)]
Email = Annotated[str, Field(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$", max_length=320)]
OrderStatus = Literal["pending", "paid", "shipped", "delivered", "cancelled"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, allow_inf_nan=False)


class _Patch(_Body):
    """A partial update: only the fields given change; ``null`` only where allowed."""

    nullable: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="after")
    def _changes_something(self) -> _Patch:
        if not self.model_fields_set:
            raise ValueError(f"give at least one of: {', '.join(type(self).model_fields)}")
        for name in self.model_fields_set:
            if getattr(self, name) is None and name not in self.nullable:
                raise ValueError(f"{name}: may not be null")
        return self

    def changes(self) -> dict[str, object]:
        """The fields given, by name."""
        return {name: getattr(self, name) for name in self.model_fields_set}


class TenantIn(_Body):
    name: Name


class ProductIn(_Body):
    name: Name
    description: Annotated[str, Field(max_length=5000)] = ""
    price: Price
    category_id: Id
    images: Images = []


class ProductPatch(_Patch):
    name: Name | None = None
    description: Annotated[str, Field(max_length=5000)] | None = None
    price: Price | None = None
    category_id: Id | None = None
    images: Images | None = None


class StockIn(_Body):
    stock: Annotated[int, Field(strict=True, ge=0, le=1_000_000_000)]


class CategoryIn(_Body):
    name: Name
    parent_id: Id | None = None


class CategoryPatch(_Patch):
    nullable = frozenset({"parent_id"})

    name: Name | None = None
    parent_id: Id | None = None


class ShopIn(_Body):
    name: Name
    lat: Annotated[float, Field(ge=-90, le=90)]
    lng: Annotated[float, Field(ge=-180, le=180)]


class OrderItemIn(_Body):
    product_id: Id
    quantity: Annotated[int, Field(strict=True, ge=1, le=10_000)]


class OrderIn(_Body):
    items: Annotated[list[OrderItemIn], Field(min_length=1, max_length=100)]

    @model_validator(mode="after")
    def _one_line_per_product(self) -> OrderIn:
        seen: set[str] = set()
        for index, item in enumerate(self.items):
            if item.product_id in seen:
                raise ValueError(f"items.{index}.product_id: {item.product_id!r} is listed twice")
            seen.add(item.product_id)
        return self


class OrderPatch(_Patch):
    nullable = frozenset({"tracking_number", "estimated_delivery"})

    status: OrderStatus | None = None
    tracking_number: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    estimated_delivery: date | None = None


class UserIn(_Body):
    name: Name
    email: Email


class UserPatch(_Patch):
    name: Name | None = None
    email: Email | None = None
