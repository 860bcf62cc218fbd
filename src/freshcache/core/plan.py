"""What one change invalidates, as data: exact keys, tags to purge, namespaces to bump.

The rules turn an event into an :class:`InvalidationPlan`; adapters (stores, near caches,
the CDN purger) carry it out. Plans from several events coalesce with ``|`` so that a
burst of changes touching the same targets does each of them once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from freshcache.core.keys import CacheKey, Namespace, Tag

__all__ = ["InvalidationPlan"]

_Target = TypeVar("_Target")


def _unique(items: Iterable[_Target], identity: Callable[[_Target], str]) -> tuple[_Target, ...]:
    seen: dict[str, _Target] = {}
    for item in items:
        seen.setdefault(identity(item), item)
    return tuple(seen.values())


@dataclass(frozen=True, slots=True)
class InvalidationPlan:
    """Exact keys to delete, tags to purge and namespaces to bump, each listed once.

    Targets keep the order in which they were first given; a repeated target (same
    physical key, tag or namespace) is dropped.
    """

    keys: tuple[CacheKey, ...] = ()
    tags: tuple[Tag, ...] = ()
    namespaces: tuple[Namespace, ...] = ()

    def __post_init__(self) -> None:
        # CacheKey holds a parts mapping and is not hashable: targets are identified by
        # the physical names the stores act on.
        object.__setattr__(self, "keys", _unique(self.keys, lambda key: key.physical))
        object.__setattr__(self, "tags", _unique(self.tags, lambda tag: tag.physical))
        object.__setattr__(
            self,
            "namespaces",
            _unique(self.namespaces, lambda namespace: namespace.generation_key),
        )

    @classmethod
    def merge(cls, *plans: InvalidationPlan) -> InvalidationPlan:
        """One plan doing everything ``plans`` do, each target once."""
        return cls(
            keys=tuple(key for plan in plans for key in plan.keys),
            tags=tuple(tag for plan in plans for tag in plan.tags),
            namespaces=tuple(namespace for plan in plans for namespace in plan.namespaces),
        )

    def __or__(self, other: InvalidationPlan) -> InvalidationPlan:
        return InvalidationPlan.merge(self, other)

    @property
    def is_empty(self) -> bool:
        """Whether the plan invalidates nothing."""
        return not (self.keys or self.tags or self.namespaces)

    def describe(self) -> tuple[str, ...]:
        """One line per action, e.g. ``delete key product:t1:p1``, ``bump namespace ...``."""
        return (
            *(f"delete key {key.name}" for key in self.keys),
            *(f"purge tag {tag.name}" for tag in self.tags),
            *(f"bump namespace {namespace.name}" for namespace in self.namespaces),
        )
