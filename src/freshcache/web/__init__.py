"""ASGI integration: HTTP caching headers (Cache-Control, ETag and 304, Vary, surrogate keys)
for the routes of a FastAPI or Starlette application."""

from freshcache.web.middleware import HttpCacheMiddleware, if_none_match_matches, strong_etag
from freshcache.web.policy import CachePolicy, set_cache_policy

__all__ = [
    "CachePolicy",
    "HttpCacheMiddleware",
    "if_none_match_matches",
    "set_cache_policy",
    "strong_etag",
]
