"""Rows to JSON records: the shapes the API returns (and the cache holds)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Row

__all__ = ["cents", "iso_date", "price", "product_record", "timestamp"]


def cents(amount: Decimal) -> int:
    """A validated price (two decimals at most) in cents."""
    return int(amount * 100)


def price(amount_cents: int) -> float:
    """Cents as the JSON number clients expect (``19.99``)."""
    return amount_cents / 100


def timestamp(moment: datetime) -> str:
    """ISO 8601 in UTC (SQLite hands back naive UTC datetimes, PostgreSQL aware ones)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def iso_date(day: date | None) -> str | None:
    return None if day is None else day.isoformat()


def product_record(row: Row[Any]) -> dict[str, Any]:
    """A product's base record: everything but stock (the real-time layer)."""
    return {
        "id": row.id,
        "name": row.name,
        "description": row.description,
        "price": price(row.price_cents),
        "category_id": row.category_id,
        "images": list(row.images),
        "created_at": timestamp(row.created_at),
        "updated_at": timestamp(row.updated_at),
    }
