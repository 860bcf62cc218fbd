"""The Store contract: what the cache asks of a cache server.

A store keeps entries (serialized values with their freshness), leases (who may fill a
key), tag indexes (which entries carry a tag) and namespace generations. Every operation
that must be atomic to keep the consistency protocol is one call here; a backend makes it
atomic its own way (Lua on Redis, plain code on the single-threaded memory store).

The protocol (DESIGN.md, "The consistency protocol"):

1. A miss takes a lease (``acquire_lease``), which reports the namespace generation seen
   at that instant, and registers the key in its tags (``register_tags``) before the
   loader reads the source of truth.
2. Invalidation (``delete``, ``purge_tags``, ``bump``) removes the entry and its lease, or
   moves the generation on.
3. ``commit`` stores the loaded value only if the lease is still the caller's and the
   generation is unchanged; otherwise the value is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol, runtime_checkable

from freshcache.core.keys import CacheKey, Namespace, Tag

__all__ = ["Conflict", "Entry", "Store", "StoreUnavailable"]


class StoreUnavailable(ConnectionError):
    """The cache server could not be reached (or answered too late)."""


class Conflict(Enum):
    """What ``commit`` does when the lease is no longer the caller's."""

    DROP = "drop"
    """Drop the value: a read's fill lost the race, the newer state is someone else's."""
    INVALIDATE = "invalidate"
    """Drop the value and delete the entry: a write lost the race, so what is cached may
    not match the source of truth; the next read reloads it."""


@dataclass(frozen=True, slots=True)
class Entry:
    """A cached value as the store keeps it.

    ``fresh_until`` is a Unix timestamp (seconds); after it the entry is stale and may be
    served only within its tier's stale-while-revalidate window (the store expires it at
    the window's end). ``compute_seconds`` is how long the value took to load, used by
    probabilistic early refresh.
    """

    payload: bytes
    fresh_until: float
    compute_seconds: float = 0.0


@runtime_checkable
class Store(Protocol):
    """A cache server. Every method may raise :class:`StoreUnavailable`."""

    async def read(self, key: CacheKey) -> Entry | None:
        """The entry of ``key`` if present and of the namespace's current generation."""
        ...

    async def read_many(self, keys: Sequence[CacheKey]) -> list[Entry | None]:
        """``read`` for several keys, in one round trip where the backend allows."""
        ...

    async def acquire_lease(
        self,
        key: CacheKey,
        token: str,
        lease_seconds: float,
        *,
        steal: bool = False,
        unless_stored: bool = False,
    ) -> int | Entry | None:
        """Take the fill lease of ``key``; return the namespace generation it was taken at.

        Returns ``None`` when another holder has it (unless ``steal``: writers take the
        lease from readers so that a read's older fill cannot land after a write). With
        ``unless_stored``, returns the stored entry instead when one of the current
        generation exists (a fill that finished since the caller's read: no second load).
        """
        ...

    async def release_lease(self, key: CacheKey, token: str) -> None:
        """Give the lease back if ``token`` still holds it (a load failed)."""
        ...

    async def register_tags(self, items: Sequence[tuple[CacheKey, float]]) -> None:
        """Record each key in the index of each of its tags, until the Unix time given
        (no earlier than the key's entry can expire)."""
        ...

    async def commit(
        self,
        key: CacheKey,
        token: str,
        generation: int,
        entry: Entry,
        ttl: float,
        conflict: Conflict = Conflict.DROP,
    ) -> bool:
        """Store ``entry`` for ``ttl`` seconds if ``token`` still holds the lease and the
        generation is still ``generation``; release the lease. Returns whether it stored."""
        ...

    async def write(self, items: Sequence[tuple[CacheKey, Entry, float]]) -> None:
        """Store each ``(key, entry, ttl)`` unconditionally at the current generation and
        cancel the key's lease (a fill started before this write must not overwrite it).
        The caller registers the tags first."""
        ...

    async def delete(self, keys: Sequence[CacheKey]) -> None:
        """Remove the entries and leases of ``keys``, and their tag index members."""
        ...

    async def purge_tags(self, tags: Sequence[Tag]) -> int:
        """Remove every entry (and lease) carrying one of ``tags``; return how many keys."""
        ...

    async def bump(self, namespaces: Sequence[Namespace]) -> None:
        """Move each namespace to a new generation: all its entries become misses."""
        ...

    async def tag_index_size(self, tag: Tag) -> int:
        """How many members the tag's index holds (expired ones included until pruned)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
