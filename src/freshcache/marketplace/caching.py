"""How a route reads through the cache and declares its HTTP caching in one call.

:func:`cached_read` is cache-aside with the library's leases (``Cache.read_through``),
records hit, stale or miss for the metrics and for the response's ``X-Cache`` header
(:class:`CacheResultHeaderMiddleware`), and sets the response's :class:`CachePolicy`:
private and ``Vary: Authorization`` for tenant data, public for marketplace data.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Literal, TypeVar

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from freshcache.core.keys import CacheKey
from freshcache.core.policy import Tier
from freshcache.marketplace.auth import runtime_of
from freshcache.marketplace.metrics import CACHE_RESULT_STATE, Metrics
from freshcache.observability import CacheResult
from freshcache.web import CachePolicy, set_cache_policy

__all__ = ["CacheResultHeaderMiddleware", "cached_read", "never_cache", "with_tier"]

T = TypeVar("T")


def with_tier(key: CacheKey, tier: Tier) -> CacheKey:
    """The same entry (same physical key, tags and namespace, so the same invalidations
    reach it) stored for ``tier``'s TTL instead of its template's: today's report is
    still changing (short tier) while past days' are final (the template's long tier)."""
    return replace(key, template=replace(key.template, tier=tier))


async def cached_read(
    request: Request,
    key: CacheKey,
    loader: Callable[[], Awaitable[T]],
    scope: Literal["private", "public"],
) -> T:
    """The value of ``key``, loaded by ``loader`` on a miss (on every read when the
    settings switch caching off); the response gets the key's tier and surrogate keys as
    its HTTP caching policy. An exception of the loader (e.g. a 404) propagates and
    nothing is cached."""
    runtime = runtime_of(request)
    if runtime.settings.cache_enabled:
        read = await runtime.cache.read_through(key, loader)
        value, outcome = read.value, CacheResult(read.outcome)
    else:
        value, outcome = await loader(), CacheResult.MISS
    metrics: Metrics = request.app.state.metrics
    metrics.record_cache_result(request, outcome)
    vary = ("Authorization",) if scope == "private" else ()
    set_cache_policy(request, CachePolicy.for_key(key, scope, vary=vary))
    return value


def never_cache(request: Request) -> None:
    """The response holds live data (stock): no cache may keep it."""
    set_cache_policy(request, CachePolicy.never())


class CacheResultHeaderMiddleware:
    """Raw ASGI middleware telling, in an ``X-Cache: hit|stale|miss`` response header,
    whether a cached read was served from the cache (``stale``: past its TTL, within its
    stale-while-revalidate window) or loaded (``miss``); responses of routes that do not
    read through the cache get no such header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_result(message: Message) -> None:
            if message["type"] == "http.response.start":
                result = scope.get("state", {}).get(CACHE_RESULT_STATE)
                if result is not None:
                    headers = [*message.get("headers", ()), (b"x-cache", result.encode())]
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_result)
