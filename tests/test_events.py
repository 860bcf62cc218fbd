"""Application events: the specification's JSON form, validated field by field."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from freshcache.core.events import Event, InvalidEvent, is_event_type, new_event, parse_event


def seed_event(**changes: Any) -> dict[str, Any]:
    """The specification's example event (with the eventId idempotency needs)."""
    event: dict[str, Any] = {
        "eventId": "0b6b5c1e-8d2a-4a43-9d5e-3f0e6f1c2a10",
        "eventType": "product.updated",
        "productId": "p1",
        "tenantId": "t1",
        "affectedCaches": [
            "product:t1:p1",
            "products:t1:*",
            "marketplace:products:search:*",
        ],
        "timestamp": "2024-09-20T10:30:00Z",
    }
    for name, value in changes.items():
        if value is _DROP:
            del event[name]
        else:
            event[name] = value
    return event


_DROP = object()


def test_a_valid_event_keeps_every_field() -> None:
    event = parse_event(seed_event(shopName="Corner shop"))

    assert event.event_id == "0b6b5c1e-8d2a-4a43-9d5e-3f0e6f1c2a10"
    assert event.event_type == "product.updated"
    assert event.tenant_id == "t1"
    assert event.timestamp == datetime(2024, 9, 20, 10, 30, tzinfo=UTC)
    assert event.affected_caches == (
        "product:t1:p1",
        "products:t1:*",
        "marketplace:products:search:*",
    )
    assert dict(event.fields) == {"productId": "p1", "shopName": "Corner shop"}
    assert dict(event.bindings) == {"tenantId": "t1", "productId": "p1", "shopName": "Corner shop"}


def test_json_text_bytes_and_mappings_parse_alike() -> None:
    document = seed_event()
    as_bytes = orjson.dumps(document)

    assert parse_event(as_bytes) == parse_event(as_bytes.decode()) == parse_event(document)


def test_affected_caches_may_be_left_out() -> None:
    assert parse_event(seed_event(affectedCaches=_DROP)).affected_caches == ()


def test_timestamps_with_an_offset_are_kept_as_utc() -> None:
    event = parse_event(seed_event(timestamp="2024-09-20T12:30:00+02:00"))

    assert event.timestamp == datetime(2024, 9, 20, 10, 30, tzinfo=UTC)
    assert event.timestamp.utcoffset() == timedelta(0)


def test_to_json_round_trips() -> None:
    event = parse_event(seed_event(orderId="o1", quantity=3, note={"nested": [1, 2]}))

    assert parse_event(event.to_json()) == event
    assert orjson.loads(event.to_json())["timestamp"] == "2024-09-20T10:30:00Z"


def test_new_event_generates_an_id_and_a_timestamp() -> None:
    before = datetime.now(UTC)
    first = new_event("category.updated", "t1", categoryId="c1", affected_caches=["categories"])
    second = new_event("category.updated", "t1", categoryId="c1")

    assert uuid.UUID(first.event_id).version == 4
    assert first.event_id != second.event_id
    assert before <= first.timestamp <= datetime.now(UTC)
    assert first.fields == {"categoryId": "c1"}
    assert first.affected_caches == ("categories",)
    assert parse_event(first.to_json()) == first


def test_new_event_keeps_a_given_id_and_timestamp() -> None:
    moment = datetime(2024, 9, 20, 10, 30, tzinfo=timezone(timedelta(hours=2)))
    event = new_event("order.created", "t1", event_id="e-1", timestamp=moment, orderId="o1")

    assert event.event_id == "e-1"
    assert event.timestamp == moment
    assert event.timestamp.tzinfo is UTC


@pytest.mark.parametrize(
    ("arguments", "fields", "field"),
    [
        (("product.updated", ""), {}, "tenantId"),
        (("product updated", "t1"), {}, "eventType"),
        (("product.updated", "t1"), {"productId": ""}, "productId"),
        (("product.updated", "t1"), {"tenantId": "t2"}, "tenantId"),
        (("product.updated", "t1"), {"categoryId": 12}, "categoryId"),
    ],
)
def test_new_event_validates_like_parse_event(
    arguments: tuple[str, str], fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidEvent) as raised:
        new_event(*arguments, **fields)
    assert raised.value.field == field


def test_new_event_refuses_a_naive_timestamp() -> None:
    with pytest.raises(InvalidEvent) as raised:
        new_event("product.updated", "t1", timestamp=datetime(2024, 9, 20, 10, 30))
    assert raised.value.field == "timestamp"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"eventType": _DROP}, "eventType"),
        ({"eventType": 7}, "eventType"),
        ({"eventType": "productupdated"}, "eventType"),
        ({"eventType": "product.updated.now"}, "eventType"),
        ({"eventType": "Product.updated"}, "eventType"),
        ({"eventType": "product.*"}, "eventType"),
        ({"eventId": _DROP}, "eventId"),
        ({"eventId": ""}, "eventId"),
        ({"eventId": 42}, "eventId"),
        ({"tenantId": _DROP}, "tenantId"),
        ({"tenantId": ""}, "tenantId"),
        ({"tenantId": ["t1"]}, "tenantId"),
        ({"tenantId": None}, "tenantId"),
        ({"productId": ""}, "productId"),
        ({"productId": None}, "productId"),
        ({"categoryId": 12}, "categoryId"),
        ({"timestamp": _DROP}, "timestamp"),
        ({"timestamp": "yesterday"}, "timestamp"),
        ({"timestamp": 1695196800}, "timestamp"),
        ({"timestamp": "2024-09-20T10:30:00"}, "timestamp"),
        ({"affectedCaches": "product:t1:p1"}, "affectedCaches"),
        ({"affectedCaches": [1]}, "affectedCaches"),
        ({"affectedCaches": [""]}, "affectedCaches"),
        ({"affectedCaches": None}, "affectedCaches"),
    ],
)
def test_each_malformed_field_is_named(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidEvent) as raised:
        parse_event(seed_event(**changes))

    assert raised.value.field == field
    assert str(raised.value).startswith(f"{field}: ")


@pytest.mark.parametrize("document", [b"{", "", b"[]", '"product.updated"', "null"])
def test_a_document_that_is_not_an_object_is_refused(document: str | bytes) -> None:
    with pytest.raises(InvalidEvent) as raised:
        parse_event(document)
    assert raised.value.field == "event"


def test_invalid_event_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="tenantId: is missing"):
        parse_event(seed_event(tenantId=_DROP))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("product.updated", True),
        ("stock.lowAlert", True),
        ("order_line.created", True),
        ("product", False),
        (".updated", False),
        ("product.", False),
        ("a.b.c", False),
        (3, False),
    ],
)
def test_event_type_form(name: object, expected: bool) -> None:
    assert is_event_type(name) is expected


def test_events_are_immutable() -> None:
    event = parse_event(seed_event())

    with pytest.raises(AttributeError):
        event.tenant_id = "t2"  # type: ignore[misc]
    with pytest.raises(TypeError):
        event.fields["productId"] = "p2"  # type: ignore[index]
    assert isinstance(event, Event)
