"""How values become bytes in the store. orjson by default; any object with ``dumps`` and
``loads`` will do."""

from __future__ import annotations

from typing import Any, Protocol

import orjson

__all__ = ["JsonSerializer", "Serializer"]


class Serializer(Protocol):
    """Turns cached values into bytes and back."""

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


class JsonSerializer:
    """orjson: JSON types, dataclasses, datetimes, UUIDs; non-str dict keys allowed."""

    _OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY

    def dumps(self, value: Any) -> bytes:
        return orjson.dumps(value, option=self._OPTIONS)

    def loads(self, data: bytes) -> Any:
        return orjson.loads(data)
