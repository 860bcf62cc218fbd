"""How a route's response may be cached: the policy a route declares for the middleware.

A route calls :func:`set_cache_policy` while it handles a request; the policy travels in
the request's ASGI state to :class:`~freshcache.web.middleware.HttpCacheMiddleware`, which
turns it into ``Cache-Control``, ``ETag``, ``Vary`` and surrogate-key headers when the
response starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from starlette.requests import Request

from freshcache.core.keys import CacheKey
from freshcache.core.policy import Tier

__all__ = ["POLICY_STATE_KEY", "CachePolicy", "set_cache_policy"]

POLICY_STATE_KEY = "freshcache_policy"
"""The key of the policy in the ASGI ``scope["state"]`` dict (``request.state``)."""

# RFC 9110 field names (tokens), for Vary.
_FIELD_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Surrogate keys are space-separated in one header: visible ASCII only.
_SURROGATE_KEY = re.compile(r"^[\x21-\x7e]+$")


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """How a response may be cached by browsers and CDNs.

    ``tier`` gives ``max-age`` (its TTL) and ``stale-while-revalidate``; it is ``None``
    only with ``no_store=True`` (use :meth:`never`). ``scope`` is ``"private"`` for data
    only its user (tenant) may see, ``"public"`` for data a shared cache may keep (the
    marketplace). ``surrogate_keys`` go to the ``Surrogate-Key`` and ``xkey`` headers, so
    a CDN purge by any of them removes the response; ``vary`` lists request headers the
    response depends on (``("Authorization",)`` when the tenant matters), merged into
    ``Vary``. ``no_store`` forbids every cache to keep the response (live stock).
    """

    tier: Tier | None
    scope: Literal["private", "public"]
    surrogate_keys: tuple[str, ...] = ()
    vary: tuple[str, ...] = ()
    no_store: bool = False

    def __post_init__(self) -> None:
        if self.scope not in ("private", "public"):
            raise ValueError(f"scope must be 'private' or 'public', got {self.scope!r}")
        if self.no_store and self.tier is not None:
            raise ValueError("a no-store policy has no tier: use CachePolicy.never()")
        if not self.no_store and self.tier is None:
            raise ValueError("a cacheable policy needs a tier (or no_store=True)")
        for key in self.surrogate_keys:
            if not _SURROGATE_KEY.match(key):
                raise ValueError(
                    f"surrogate key {key!r} must be non-empty visible ASCII without spaces"
                )
        for name in self.vary:
            if not _FIELD_NAME.match(name):
                raise ValueError(f"Vary entry {name!r} is not an HTTP field name")

    @classmethod
    def for_key(
        cls,
        key: CacheKey,
        scope: Literal["private", "public"],
        vary: tuple[str, ...] = (),
    ) -> CachePolicy:
        """The policy of a response built from the cache entry ``key``: its tier, and its
        name, tags and namespace as surrogate keys (what the invalidation workers purge)."""
        return cls(tier=key.tier, scope=scope, surrogate_keys=key.surrogate_keys, vary=vary)

    @classmethod
    def never(cls) -> CachePolicy:
        """A policy that forbids caching the response anywhere (``Cache-Control: no-store``)."""
        return cls(tier=None, scope="private", no_store=True)

    @property
    def cache_control(self) -> str:
        """The ``Cache-Control`` header value, e.g.
        ``public, max-age=300, stale-while-revalidate=60`` or ``no-store``."""
        if self.tier is None:
            return "no-store"
        return self.tier.cache_control(self.scope)


def set_cache_policy(request: Request, policy: CachePolicy) -> None:
    """Declare how the response to ``request`` may be cached.

    Call it from a route (or a dependency) before the response starts; the last call
    wins. Without a call, :class:`~freshcache.web.middleware.HttpCacheMiddleware` leaves
    the response as the route made it.
    """
    setattr(request.state, POLICY_STATE_KEY, policy)
