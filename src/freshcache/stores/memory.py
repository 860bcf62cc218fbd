"""The embedded default store: one process, bounded, LRU, TTL.

Every method runs without awaiting anything, so on one event loop each is atomic, which
is what the Redis backend gets from Lua.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from freshcache.core.keys import CacheKey, Namespace, Tag, lease_key
from freshcache.stores.base import Conflict, Entry

__all__ = ["MemoryStore"]


@dataclass(slots=True)
class _Record:
    generation: int
    entry: Entry
    expires_at: float
    tags: tuple[str, ...]


class MemoryStore:
    """An in-process store holding at most ``max_entries`` entries (least recently used
    are evicted first). ``clock`` returns Unix time in seconds (tests may pass their own).
    """

    def __init__(self, max_entries: int = 100_000, clock: Callable[[], float] = time.time):
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self.evictions = 0
        self._clock = clock
        self._entries: OrderedDict[str, _Record] = OrderedDict()
        self._leases: dict[str, tuple[str, float]] = {}
        self._generations: dict[str, int] = {}
        self._tags: dict[str, dict[str, float]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def _generation(self, key: CacheKey) -> int:
        return self._generations.get(key.generation_key, 0)

    def _read(self, key: CacheKey, now: float) -> Entry | None:
        record = self._entries.get(key.physical)
        if record is None:
            return None
        if record.expires_at <= now:
            self._drop(key.physical, now)
            return None
        if record.generation != self._generation(key):
            return None
        self._entries.move_to_end(key.physical)
        return record.entry

    async def read(self, key: CacheKey) -> Entry | None:
        return self._read(key, self._clock())

    async def read_many(self, keys: Sequence[CacheKey]) -> list[Entry | None]:
        now = self._clock()
        return [self._read(key, now) for key in keys]

    async def acquire_lease(
        self,
        key: CacheKey,
        token: str,
        lease_seconds: float,
        *,
        steal: bool = False,
        unless_stored: bool = False,
    ) -> int | Entry | None:
        now = self._clock()
        if unless_stored and not steal:
            stored = self._read(key, now)
            if stored is not None:
                return stored
        holder = self._leases.get(key.lease_key)
        if holder is not None and holder[1] > now and not steal:
            return None
        self._leases[key.lease_key] = (token, now + lease_seconds)
        return self._generation(key)

    async def release_lease(self, key: CacheKey, token: str) -> None:
        holder = self._leases.get(key.lease_key)
        if holder is not None and holder[0] == token:
            del self._leases[key.lease_key]

    async def register_tags(self, items: Sequence[tuple[CacheKey, float]]) -> None:
        now = self._clock()
        for key, until in items:
            for tag in key.tags:
                members = self._tags.setdefault(tag.physical, {})
                members[key.physical] = max(until, members.get(key.physical, until))
                for member, member_until in list(members.items()):
                    if member_until < now:
                        del members[member]

    async def commit(
        self,
        key: CacheKey,
        token: str,
        generation: int,
        entry: Entry,
        ttl: float,
        conflict: Conflict = Conflict.DROP,
    ) -> bool:
        now = self._clock()
        holder = self._leases.get(key.lease_key)
        if holder is None or holder[0] != token or holder[1] <= now:
            if conflict is Conflict.INVALIDATE:
                self._leases.pop(key.lease_key, None)
                self._drop(key.physical, now)
            return False
        del self._leases[key.lease_key]
        if self._generation(key) != generation:
            return False
        self._store(key, generation, entry, now, ttl)
        return True

    async def write(self, items: Sequence[tuple[CacheKey, Entry, float]]) -> None:
        now = self._clock()
        for key, entry, ttl in items:
            self._leases.pop(key.lease_key, None)
            self._store(key, self._generation(key), entry, now, ttl)

    def _store(self, key: CacheKey, generation: int, entry: Entry, now: float, ttl: float) -> None:
        tags = tuple(tag.physical for tag in key.tags)
        self._entries[key.physical] = _Record(generation, entry, now + ttl, tags)
        self._entries.move_to_end(key.physical)
        # Like Redis' active expiry: reclaim expired entries at the cold end as we go.
        for _ in range(2):
            oldest = next(iter(self._entries.values()))
            if oldest.expires_at > now:
                break
            self._drop(next(iter(self._entries)), now)
        while len(self._entries) > self.max_entries:
            self._drop(next(iter(self._entries)), now)
            self.evictions += 1

    def _drop(self, physical: str, now: float) -> None:
        record = self._entries.pop(physical, None)
        if record is None:
            return
        # A live lease means a fill has registered this key in its tags already; that
        # registration must outlive the old entry, or a purge would miss the new one.
        lease = self._leases.get(lease_key(physical))
        if lease is None or lease[1] <= now:
            self._unregister(physical, record.tags)

    def _unregister(self, physical: str, tags: Sequence[str]) -> None:
        for tag in tags:
            members = self._tags.get(tag)
            if members is not None:
                members.pop(physical, None)
                if not members:
                    del self._tags[tag]

    async def delete(self, keys: Sequence[CacheKey]) -> None:
        now = self._clock()
        for key in keys:
            self._leases.pop(key.lease_key, None)
            self._drop(key.physical, now)
            self._unregister(key.physical, [tag.physical for tag in key.tags])

    async def purge_tags(self, tags: Sequence[Tag]) -> int:
        now = self._clock()
        purged = 0
        for tag in tags:
            for member in self._tags.pop(tag.physical, {}):
                self._leases.pop(lease_key(member), None)
                self._drop(member, now)
                purged += 1
        return purged

    async def bump(self, namespaces: Sequence[Namespace]) -> None:
        for namespace in namespaces:
            key = namespace.generation_key
            self._generations[key] = self._generations.get(key, 0) + 1

    async def tag_index_size(self, tag: Tag) -> int:
        return len(self._tags.get(tag.physical, {}))

    async def close(self) -> None:
        return None
