"""The near cache: an optional in-process L1 in front of the shared store.

It holds decoded values for a short time (``ttl``, capped by the entry's own freshness)
and is dropped by the invalidation broadcasts every instance receives. Two rules keep it
from serving what the shared store no longer would:

- A value read from the store is kept only if no invalidation arrived while it was being
  read (the ``epoch`` check): otherwise the read may have returned a value that the
  invalidation, applied meanwhile, removed.
- While its broadcast subscription is down it may miss invalidations, so it clears
  itself and stays off until the subscription is back (counted in ``clears``).

Values are shared between callers, not copied: treat what the cache returns as read-only.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import orjson

from freshcache.core.keys import CacheKey

__all__ = ["MISSING", "NearCache", "NearCacheStats", "encode_invalidation"]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()
"""Returned by :meth:`NearCache.lookup` when it has no usable value."""


@dataclass
class NearCacheStats:
    """Entries dropped by invalidations, and whole clears (subscription lost or back)."""

    dropped: int = 0
    clears: int = 0


@dataclass(slots=True)
class _NearEntry:
    value: object
    expires_at: float
    tags: tuple[str, ...]
    namespace: str | None


def encode_invalidation(
    keys: Iterable[str] = (), tags: Iterable[str] = (), namespaces: Iterable[str] = ()
) -> bytes:
    """The broadcast payload for an invalidation (physical key, tag and generation names)."""
    return orjson.dumps({"keys": list(keys), "tags": list(tags), "namespaces": list(namespaces)})


class NearCache:
    """An in-process LRU of at most ``max_entries`` values, each kept at most ``ttl``
    seconds.

    ``standalone=True`` serves without a broadcast subscription: only correct when every
    invalidation of the shared store goes through the Cache this near cache belongs to
    (one process). Otherwise it serves only while subscribed.
    """

    def __init__(self, max_entries: int = 10_000, ttl: float = 5.0, *, standalone: bool = False):
        if max_entries < 1 or ttl <= 0:
            raise ValueError("max_entries must be >= 1 and ttl > 0")
        self.max_entries = max_entries
        self.ttl = ttl
        self.enabled = standalone
        self.epoch = 0
        self.stats = NearCacheStats()
        self._entries: OrderedDict[str, _NearEntry] = OrderedDict()
        self._by_tag: dict[str, set[str]] = {}
        self._by_namespace: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, physical: str) -> object:
        """The value kept for the key, or :data:`MISSING`."""
        entry = self._entries.get(physical)
        if entry is None or not self.enabled:
            return MISSING
        if entry.expires_at <= time.time():
            self._forget(physical)
            return MISSING
        self._entries.move_to_end(physical)
        return entry.value

    def keep(self, key: CacheKey, value: object, fresh_until: float, epoch: int) -> None:
        """Keep ``value``, read from the store when ``self.epoch`` was ``epoch``."""
        if not self.enabled or epoch != self.epoch:
            return
        physical = key.physical
        if physical in self._entries:
            self._forget(physical)
        tags = tuple(tag.physical for tag in key.tags)
        namespace = key.namespace.generation_key if key.namespace else None
        expires_at = min(fresh_until, time.time() + self.ttl)
        self._entries[physical] = _NearEntry(value, expires_at, tags, namespace)
        for tag in tags:
            self._by_tag.setdefault(tag, set()).add(physical)
        if namespace is not None:
            self._by_namespace.setdefault(namespace, set()).add(physical)
        while len(self._entries) > self.max_entries:
            self._forget(next(iter(self._entries)))

    def invalidate(
        self, keys: Iterable[str] = (), tags: Iterable[str] = (), namespaces: Iterable[str] = ()
    ) -> None:
        """Drop these physical keys, the keys carrying these tags and the keys of these
        namespaces (by generation key)."""
        self.epoch += 1
        doomed = set(keys)
        for tag in tags:
            doomed |= self._by_tag.get(tag, set())
        for namespace in namespaces:
            doomed |= self._by_namespace.get(namespace, set())
        for physical in doomed:
            if physical in self._entries:
                self._forget(physical)
                self.stats.dropped += 1

    def clear(self) -> None:
        self.epoch += 1
        self._entries.clear()
        self._by_tag.clear()
        self._by_namespace.clear()
        self.stats.clears += 1

    def _forget(self, physical: str) -> None:
        entry = self._entries.pop(physical)
        for tag in entry.tags:
            members = self._by_tag.get(tag)
            if members is not None:
                members.discard(physical)
                if not members:
                    del self._by_tag[tag]
        if entry.namespace is not None:
            members = self._by_namespace.get(entry.namespace)
            if members is not None:
                members.discard(physical)
                if not members:
                    del self._by_namespace[entry.namespace]

    # -- broadcast listener -----------------------------------------------------------

    def on_message(self, payload: bytes) -> None:
        try:
            message = orjson.loads(payload)
            self.invalidate(message["keys"], message["tags"], message["namespaces"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            # Unreadable: the safe reading of an invalidation we cannot parse is "all".
            self.clear()

    def on_connected(self) -> None:
        self.clear()
        self.enabled = True

    def on_disconnected(self) -> None:
        self.enabled = False
        self.clear()
