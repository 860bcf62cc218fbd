"""Application events in the specification's JSON form, validated.

An event says what changed, for which tenant, and when::

    {"eventId": "7d0c...", "eventType": "product.updated", "tenantId": "t1",
     "productId": "p1", "affectedCaches": ["product:t1:p1"],
     "timestamp": "2024-09-20T10:30:00Z"}

Identifiers such as ``productId``, ``categoryId``, ``orderId`` or ``userId`` (any other
top-level field, in fact) are kept in :attr:`Event.fields`; the rules bind their
``{placeholders}`` from them. ``eventId`` makes redelivery idempotent, so an event from
outside must carry one; producers create events with :func:`new_event`, which generates
it. Validation is strict because a malformed event must be dead-lettered, never read as
"invalidate everything".
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType

import orjson

__all__ = ["Event", "InvalidEvent", "is_event_type", "new_event", "parse_event"]

_EVENT_TYPE = re.compile(r"^[a-z][A-Za-z0-9_]*\.[a-z][A-Za-z0-9_]*$")
_RESERVED = ("eventId", "eventType", "tenantId", "timestamp", "affectedCaches")


class InvalidEvent(ValueError):
    """An event that cannot be used; ``field`` names the offending field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def is_event_type(name: object) -> bool:
    """Whether ``name`` has the ``entity.action`` form, e.g. ``product.updated``."""
    return isinstance(name, str) and _EVENT_TYPE.match(name) is not None


@dataclass(frozen=True, slots=True)
class Event:
    """A validated event; build it with :func:`parse_event` or :func:`new_event`.

    ``fields`` holds every top-level field besides the five named here, under its JSON
    name (``productId``...), with its JSON value.
    """

    event_id: str
    event_type: str
    tenant_id: str
    timestamp: datetime
    affected_caches: tuple[str, ...] = ()
    fields: Mapping[str, object] = field(default_factory=dict, hash=False)

    @property
    def bindings(self) -> Mapping[str, object]:
        """The values rule placeholders may use: ``tenantId`` and every field."""
        return MappingProxyType({"tenantId": self.tenant_id, **self.fields})

    def to_dict(self) -> dict[str, object]:
        """The event in its JSON form (the inverse of :func:`parse_event`)."""
        return {
            "eventId": self.event_id,
            "eventType": self.event_type,
            "tenantId": self.tenant_id,
            **self.fields,
            "affectedCaches": list(self.affected_caches),
            "timestamp": _format_timestamp(self.timestamp),
        }

    def to_json(self) -> bytes:
        """The event as a JSON document (UTF-8), as it travels on the bus."""
        return orjson.dumps(self.to_dict())


def parse_event(data: bytes | str | Mapping[str, object]) -> Event:
    """Validate an event given as JSON text or as an already decoded mapping.

    Raises :class:`InvalidEvent` naming the first field that is missing or malformed.
    Unknown fields are allowed and kept in :attr:`Event.fields`.
    """
    document: object = data
    if isinstance(data, bytes | str):
        try:
            document = orjson.loads(data)
        except orjson.JSONDecodeError as error:
            raise InvalidEvent("event", f"not valid JSON ({error})") from None
    if not isinstance(document, Mapping):
        raise InvalidEvent("event", f"must be a JSON object, got {type(document).__name__}")
    for name, value in document.items():
        if not isinstance(name, str):
            raise InvalidEvent("event", f"field names must be strings, got {name!r}")
        if name.endswith("Id") and (not isinstance(value, str) or not value):
            raise InvalidEvent(name, f"must be a non-empty string, got {value!r}")
    event_type = document.get("eventType")
    if event_type is None:
        raise InvalidEvent("eventType", "is missing")
    if not is_event_type(event_type):
        raise InvalidEvent("eventType", f"must look like 'entity.action', got {event_type!r}")
    return Event(
        event_id=_required_id(document, "eventId"),
        event_type=str(event_type),
        tenant_id=_required_id(document, "tenantId"),
        timestamp=_parse_timestamp(document.get("timestamp")),
        affected_caches=_parse_affected_caches(document.get("affectedCaches", [])),
        fields=MappingProxyType(
            {name: value for name, value in document.items() if name not in _RESERVED}
        ),
    )


def new_event(
    event_type: str,
    tenant_id: str,
    *,
    affected_caches: Iterable[str] = (),
    event_id: str | None = None,
    timestamp: datetime | None = None,
    **fields: object,
) -> Event:
    """A new, validated event, with a fresh uuid4 ``eventId`` and the current time.

    ``fields`` are the event's identifiers under their JSON names, e.g.
    ``new_event("product.updated", "t1", productId="p1")``.
    """
    clashing = sorted(set(fields) & set(_RESERVED))
    if clashing:
        raise InvalidEvent(clashing[0], "is set by new_event's own parameters")
    moment = datetime.now(UTC) if timestamp is None else timestamp
    if moment.tzinfo is None:
        raise InvalidEvent("timestamp", "must carry a UTC offset")
    return parse_event(
        {
            "eventId": str(uuid.uuid4()) if event_id is None else event_id,
            "eventType": event_type,
            "tenantId": tenant_id,
            **fields,
            "affectedCaches": list(affected_caches),
            "timestamp": _format_timestamp(moment),
        }
    )


def _required_id(document: Mapping[str, object], name: str) -> str:
    value = document.get(name)
    if value is None:
        raise InvalidEvent(name, "is missing")
    if not isinstance(value, str) or not value:
        raise InvalidEvent(name, f"must be a non-empty string, got {value!r}")
    return value


def _parse_timestamp(value: object) -> datetime:
    if value is None:
        raise InvalidEvent("timestamp", "is missing")
    if not isinstance(value, str):
        raise InvalidEvent("timestamp", f"must be an ISO-8601 string, got {value!r}")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidEvent("timestamp", f"is not ISO-8601: {value!r}") from None
    if moment.tzinfo is None:
        raise InvalidEvent("timestamp", f"must carry a UTC offset (e.g. 'Z'): {value!r}")
    return moment.astimezone(UTC)


def _format_timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _parse_affected_caches(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise InvalidEvent("affectedCaches", f"must be a list of strings, got {value!r}")
    for entry in value:
        if not isinstance(entry, str) or not entry:
            raise InvalidEvent("affectedCaches", f"entries must be non-empty strings: {entry!r}")
    return tuple(value)
