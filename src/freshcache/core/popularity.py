"""The most read keys of a stream, in bounded memory: Space-Saving.

Space-Saving (Metwally, Agrawal and El Abbadi, "Efficient Computation of Frequent and
Top-k Elements in Data Streams", 2005) keeps at most ``capacity`` counters. A new item
takes the place of one with the smallest count and inherits that count (plus one) as its
possible overestimate (``error``). Guarantees, for a stream of ``n`` items:

- every item seen more than ``n / capacity`` times is kept;
- a kept item's ``count`` is at least its true frequency, and at most ``error`` above it;
- the counts add up to ``n``.

Counts sit in buckets of equal count (the paper's "stream summary"), so recording an item
costs O(1) whatever the capacity. :meth:`SpaceSaving.decay` halves every count, so that
what was popular long ago gives way to what is popular now.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Counted", "SpaceSaving"]

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Counted(Generic[K]):
    """A kept item, its estimated count and how much of that may be overestimated."""

    item: K
    count: int
    error: int


class SpaceSaving(Generic[K]):
    """The heavy hitters of a stream of items, with at most ``capacity`` counters."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.total = 0
        """How many items were recorded (the weight of the stream, halved by ``decay``)."""
        self._counts: dict[K, int] = {}
        self._errors: dict[K, int] = {}
        # count -> the items with that count, oldest first (dicts keep insertion order).
        self._buckets: dict[int, dict[K, None]] = {}
        self._smallest = 0

    def __len__(self) -> int:
        return len(self._counts)

    def __contains__(self, item: object) -> bool:
        return item in self._counts

    def count(self, item: K) -> int:
        """The estimated count of ``item`` (0 if it is not kept)."""
        return self._counts.get(item, 0)

    def error(self, item: K) -> int:
        """How much the count of ``item`` may exceed its true frequency (0 if not kept)."""
        return self._errors.get(item, 0)

    def offer(self, item: K) -> K | None:
        """Record one occurrence of ``item``; return the item it replaced, if any."""
        self.total += 1
        count = self._counts.get(item)
        if count is not None:
            self._move(item, count, count + 1)
            return None
        if len(self._counts) < self.capacity:
            self._counts[item] = 1
            self._errors[item] = 0
            self._buckets.setdefault(1, {})[item] = None
            self._smallest = 1
            return None
        smallest = self._smallest
        bucket = self._buckets[smallest]
        replaced = next(iter(bucket))  # the longest at the smallest count
        del bucket[replaced], self._counts[replaced], self._errors[replaced]
        self._counts[item] = smallest
        self._errors[item] = smallest
        bucket[item] = None
        self._move(item, smallest, smallest + 1)
        return replaced

    def _move(self, item: K, count: int, new_count: int) -> None:
        bucket = self._buckets[count]
        del bucket[item]
        if not bucket:
            del self._buckets[count]
            if count == self._smallest:
                # Counts grow by one, so the emptied smallest bucket's successor is next.
                self._smallest = new_count
        self._buckets.setdefault(new_count, {})[item] = None
        self._counts[item] = new_count

    def top(self, limit: int | None = None) -> list[Counted[K]]:
        """The kept items by decreasing count (at most ``limit``)."""
        ranked: list[Counted[K]] = []
        for count in sorted(self._buckets, reverse=True):
            for item in self._buckets[count]:
                if limit is not None and len(ranked) >= limit:
                    return ranked
                ranked.append(Counted(item, count, self._errors[item]))
        return ranked

    def decay(self) -> list[K]:
        """Halve every count (and error and the total), rounding down; forget the items
        whose count drops to 0 and return them. The order of the rest is kept."""
        forgotten = []
        buckets: dict[int, dict[K, None]] = {}
        for count in sorted(self._buckets):
            halved = count // 2
            for item in self._buckets[count]:
                if halved == 0:
                    forgotten.append(item)
                    del self._counts[item], self._errors[item]
                    continue
                self._counts[item] = halved
                self._errors[item] = self._errors[item] // 2
                buckets.setdefault(halved, {})[item] = None
        self._buckets = buckets
        self._smallest = min(buckets, default=0)
        self.total //= 2
        return forgotten
