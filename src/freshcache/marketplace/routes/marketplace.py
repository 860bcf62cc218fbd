"""The public marketplace: product search across tenants and nearby shops.

No authentication, public HTTP caching, keys without a tenant part. Requests are
normalised before they become keys (query words lower-cased, coordinates rounded, radii
bucketed), so nearby requests share an entry; and the cached result is computed from the
normalised values only, so every request that maps to an entry gets the same answer.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sqlalchemy import and_, func, or_, select

from freshcache.marketplace.auth import runtime_of
from freshcache.marketplace.caching import cached_read
from freshcache.marketplace.errors import ApiError
from freshcache.marketplace.records import price
from freshcache.marketplace.schema import products, shops, tenants

__all__ = ["RADIUS_BUCKETS_KM", "SEARCH_RADIUS_KM", "router"]

router = APIRouter(tags=["marketplace"])

RADIUS_BUCKETS_KM = (1, 2, 5, 10, 25, 50, 100)
"""A nearby request's radius is rounded up to the next of these."""
SEARCH_RADIUS_KM = 50
"""A located search lists products of sellers with a shop this close."""
_RESULTS = 50
_EARTH_RADIUS_KM = 6371.0
_KM_PER_DEGREE = 111.32
_MAX_QUERY = 100


def distance_km(lat1: float, lng1: float, lat2: float, lng2: float) -> float:
    """Great-circle distance (haversine)."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dphi, dlmb = math.radians(lat2 - lat1), math.radians(lng2 - lng1)
    a = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlmb / 2) ** 2
    return 2 * _EARTH_RADIUS_KM * math.asin(math.sqrt(min(1.0, a)))


def _round(value: float, digits: int) -> float:
    return round(value, digits) + 0.0  # + 0.0: -0.0 and 0.0 are one key


def _within_box(lat: float, lng: float, radius: float) -> Any:
    """A bounding box around the circle, for the index; exact distances come after."""
    dlat = radius / _KM_PER_DEGREE
    dlng = radius / (_KM_PER_DEGREE * max(math.cos(math.radians(lat)), 0.01))
    latitude = shops.c.lat.between(lat - dlat, lat + dlat)
    if lng - dlng < -180 or lng + dlng > 180:  # across the antimeridian: latitude only
        return latitude
    return and_(latitude, shops.c.lng.between(lng - dlng, lng + dlng))


@router.get("/api/marketplace/shops/nearby")
async def nearby_shops(
    request: Request,
    lat: Annotated[float, Query(ge=-90, le=90, allow_inf_nan=False)],
    lng: Annotated[float, Query(ge=-180, le=180, allow_inf_nan=False)],
    radius: Annotated[float, Query(gt=0, le=RADIUS_BUCKETS_KM[-1], allow_inf_nan=False)] = 5,
) -> dict[str, Any]:
    """Shops within ``radius`` km (rounded up to a bucket) of the point (2 decimals)."""
    runtime = runtime_of(request)
    center_lat, center_lng = _round(lat, 2), _round(lng, 2)
    bucket = next(size for size in RADIUS_BUCKETS_KM if radius <= size)

    async def load() -> dict[str, Any]:
        query = (
            select(
                shops.c.id, shops.c.name, shops.c.lat, shops.c.lng, tenants.c.name.label("seller")
            )
            .join(tenants, tenants.c.id == shops.c.tenant_id)
            .where(_within_box(center_lat, center_lng, bucket))
        )
        async with runtime.database.read() as connection:
            rows = (await connection.execute(query)).all()
        found = []
        for row in rows:
            distance = distance_km(center_lat, center_lng, row.lat, row.lng)
            if distance <= bucket:
                found.append(
                    {
                        "id": row.id,
                        "name": row.name,
                        "seller": row.seller,
                        "lat": row.lat,
                        "lng": row.lng,
                        "distance_km": round(distance, 3),
                    }
                )
        found.sort(key=lambda shop: (shop["distance_km"], shop["id"]))
        return {"lat": center_lat, "lng": center_lng, "radius_km": bucket, "shops": found}

    key = runtime.keyspace["marketplace:shops:nearby:{lat}:{lng}:{radius}"](
        lat=f"{center_lat:.2f}", lng=f"{center_lng:.2f}", radius=bucket
    )
    return await cached_read(request, key, load, "public")


def _parse_location(location: str | None) -> tuple[float, float] | None:
    if location is None or not location.strip():
        return None
    try:
        lat_text, lng_text = location.split(",")
        lat, lng = float(lat_text), float(lng_text)
    except ValueError:
        raise ApiError(
            422, "invalid_request", "location: expected 'lat,lng', e.g. '52.52,13.40'"
        ) from None
    if not (-90 <= lat <= 90 and -180 <= lng <= 180):
        raise ApiError(422, "invalid_request", "location: latitude or longitude out of range")
    return _round(lat, 1), _round(lng, 1)


@router.get("/api/marketplace/search")
async def search_products(
    request: Request,
    q: Annotated[str, Query(max_length=_MAX_QUERY * 4)],
    location: Annotated[str | None, Query(max_length=64)] = None,
) -> dict[str, Any]:
    """Products of every tenant whose name or description contains every word of ``q``;
    with ``location`` (``lat,lng``, rounded to 1 decimal), only those of sellers with a
    shop within :data:`SEARCH_RADIUS_KM`, nearest first."""
    runtime = runtime_of(request)
    words = q.lower().split()
    query_text = " ".join(words)
    if not words or len(query_text) > _MAX_QUERY:
        raise ApiError(422, "invalid_request", f"q: give 1 to {_MAX_QUERY} characters of words")
    center = _parse_location(location)

    async def load() -> dict[str, Any]:
        matches = [
            or_(
                func.lower(products.c.name).contains(word, autoescape=True),
                func.lower(products.c.description).contains(word, autoescape=True),
            )
            for word in words
        ]
        query = (
            select(
                products.c.id,
                products.c.name,
                products.c.price_cents,
                products.c.category_id,
                tenants.c.name.label("seller"),
            )
            .join(tenants, tenants.c.id == products.c.tenant_id)
            .where(*matches)
        )
        if center is None:
            query = query.order_by(products.c.name, products.c.id).limit(_RESULTS)
        else:
            query = query.add_columns(shops.c.lat, shops.c.lng).join(
                shops, shops.c.tenant_id == products.c.tenant_id
            )
            query = query.where(_within_box(*center, SEARCH_RADIUS_KM))
        async with runtime.database.read() as connection:
            rows = (await connection.execute(query)).all()
        results: dict[str, dict[str, Any]] = {}
        for row in rows:
            item = {
                "id": row.id,
                "name": row.name,
                "price": price(row.price_cents),
                "category_id": row.category_id,
                "seller": row.seller,
            }
            if center is not None:
                distance = distance_km(*center, row.lat, row.lng)
                if distance > SEARCH_RADIUS_KM:
                    continue
                item["distance_km"] = round(distance, 3)
                known = results.get(row.id)
                if known is not None and known["distance_km"] <= item["distance_km"]:
                    continue
            results[row.id] = item
        ordered = sorted(
            results.values(),
            key=lambda item: (item.get("distance_km", 0.0), item["name"], item["id"]),
        )
        point = None if center is None else {"lat": center[0], "lng": center[1]}
        return {"query": query_text, "location": point, "results": ordered[:_RESULTS]}

    location_part = "any" if center is None else f"{center[0]:.1f},{center[1]:.1f}"
    key = runtime.keyspace["marketplace:products:search:{query}:{location}"](
        query=query_text, location=location_part
    )
    return await cached_read(request, key, load, "public")
