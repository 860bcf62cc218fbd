"""TTL tiers and the HTTP ``Cache-Control`` they render.

The specification names three tiers: short (30 s to 5 min, for prices, dashboards and
stock approximations), medium (5 to 60 min, for catalog details, profiles, categories and
search results) and long (1 h and more, for configuration and past reports). Each tier
has a stale-while-revalidate window: after the TTL, an entry may still be served for that
long while one caller refreshes it in the background.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

__all__ = ["TIERS", "Tier", "TierError", "tier"]

Scope = Literal["private", "public"]


class TierError(ValueError):
    """A tier name or TTL outside the tier's range."""


@dataclass(frozen=True, slots=True)
class Tier:
    """A TTL tier: how long an entry is fresh, and how long it may then be served stale.

    ``ttl`` and ``stale_while_revalidate`` are seconds. ``min_ttl``/``max_ttl`` bound the
    TTLs that may be chosen within the tier (``max_ttl`` is ``None`` for "no upper bound").
    ``jitter`` is the fraction (0 to 0.5) by which TTLs are randomly shortened so entries
    written together do not all expire in the same instant.
    """

    name: str
    ttl: float
    stale_while_revalidate: float
    min_ttl: float
    max_ttl: float | None
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.ttl < self.min_ttl or (self.max_ttl is not None and self.ttl > self.max_ttl):
            upper = "" if self.max_ttl is None else f" to {self.max_ttl:g}"
            raise TierError(
                f"ttl {self.ttl:g}s is outside the {self.name} tier ({self.min_ttl:g}{upper}s)"
            )
        if self.stale_while_revalidate < 0:
            raise TierError("stale_while_revalidate must be >= 0")
        if not 0 <= self.jitter <= 0.5:
            raise TierError(f"jitter must be between 0 and 0.5, got {self.jitter}")

    def with_ttl(
        self,
        ttl: float | None = None,
        *,
        stale_while_revalidate: float | None = None,
        jitter: float | None = None,
    ) -> Tier:
        """The same tier with another TTL, stale window or jitter (validated against it)."""
        return replace(
            self,
            ttl=self.ttl if ttl is None else ttl,
            stale_while_revalidate=(
                self.stale_while_revalidate
                if stale_while_revalidate is None
                else stale_while_revalidate
            ),
            jitter=self.jitter if jitter is None else jitter,
        )

    def jittered_ttl(self, unit_random: float) -> float:
        """The TTL to store, given a uniform random number in [0, 1)."""
        return self.ttl * (1.0 - self.jitter * unit_random)

    def cache_control(self, scope: Scope | None = None) -> str:
        """The ``Cache-Control`` header value, e.g. ``max-age=300, stale-while-revalidate=60``.

        ``scope`` prepends ``private`` (tenant data) or ``public`` (marketplace data).
        """
        directives = [f"max-age={self.ttl:.0f}"]
        if self.stale_while_revalidate:
            directives.append(f"stale-while-revalidate={self.stale_while_revalidate:.0f}")
        if scope is not None:
            directives.insert(0, scope)
        return ", ".join(directives)


TIERS: dict[str, Tier] = {
    "short": Tier("short", ttl=300, stale_while_revalidate=60, min_ttl=30, max_ttl=300),
    "medium": Tier("medium", ttl=1800, stale_while_revalidate=300, min_ttl=300, max_ttl=3600),
    "long": Tier("long", ttl=3600, stale_while_revalidate=600, min_ttl=3600, max_ttl=None),
}
"""The specification's tiers with its own header values as defaults."""


def tier(name: str) -> Tier:
    """The tier called ``name`` (``short``, ``medium`` or ``long``)."""
    try:
        return TIERS[name]
    except KeyError:
        raise TierError(f"unknown tier {name!r}; expected one of {sorted(TIERS)}") from None
