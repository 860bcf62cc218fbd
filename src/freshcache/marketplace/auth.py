"""Bearer tokens: the admin token, and tenants' API keys.

The tenant of a request comes from its API key, never from the URL or the body. Keys are
stored as SHA-256 hashes; :class:`TenantDirectory` remembers recent key -> tenant lookups
in the process, so a cached GET costs no database round trip for authentication. Tenants
cannot be deleted or re-keyed through the API; a key removed by hand stops working within
``ttl`` seconds.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import select

from freshcache.marketplace.errors import ApiError
from freshcache.marketplace.runtime import Runtime
from freshcache.marketplace.schema import tenants

__all__ = [
    "AdminAccess",
    "Tenant",
    "TenantAccess",
    "TenantDirectory",
    "hash_api_key",
    "new_api_key",
    "runtime_of",
]

_SCHEME = "bearer"
_MAX_TOKEN_LENGTH = 256


@dataclass(frozen=True, slots=True)
class Tenant:
    """The caller: a tenant of the marketplace."""

    id: str
    name: str


def new_api_key() -> str:
    """A new random API key (shown once, stored hashed)."""
    return "fc_" + secrets.token_urlsafe(24)


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


class TenantDirectory:
    """API key -> tenant, with an in-process LRU of at most ``max_entries`` lookups kept
    ``ttl`` seconds. Unknown keys are not remembered (a tenant created on another
    instance works here at once)."""

    def __init__(self, runtime: Runtime, max_entries: int = 10_000, ttl: float = 60.0) -> None:
        self.runtime = runtime
        self.max_entries = max_entries
        self.ttl = ttl
        self._known: OrderedDict[str, tuple[Tenant, float]] = OrderedDict()

    async def find(self, api_key: str) -> Tenant | None:
        digest = hash_api_key(api_key)
        known = self._known.get(digest)
        if known is not None and known[1] > time.monotonic():
            self._known.move_to_end(digest)
            return known[0]
        async with self.runtime.database.read() as connection:
            row = (
                await connection.execute(
                    select(tenants.c.id, tenants.c.name).where(tenants.c.api_key_hash == digest)
                )
            ).first()
        if row is None:
            self._known.pop(digest, None)
            return None
        tenant = Tenant(row.id, row.name)
        self._known[digest] = (tenant, time.monotonic() + self.ttl)
        self._known.move_to_end(digest)
        while len(self._known) > self.max_entries:
            self._known.popitem(last=False)
        return tenant


def runtime_of(request: Request) -> Runtime:
    """The instance's :class:`Runtime` (set up by the app's lifespan)."""
    runtime: Runtime = request.app.state.runtime
    return runtime


def _bearer_token(request: Request) -> str:
    header = request.headers.get("authorization")
    if header is None:
        raise ApiError(401, "unauthorized", "missing Authorization: Bearer <token> header")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != _SCHEME or not token or len(token) > _MAX_TOKEN_LENGTH:
        raise ApiError(401, "unauthorized", "expected Authorization: Bearer <token>")
    return token


async def _tenant(request: Request) -> Tenant:
    token = _bearer_token(request)
    directory: TenantDirectory = request.app.state.tenant_directory
    tenant = await directory.find(token)
    if tenant is None:
        raise ApiError(401, "unauthorized", "unknown API key")
    return tenant


async def _admin(request: Request) -> None:
    token = _bearer_token(request)
    expected = runtime_of(request).settings.admin_token
    if not secrets.compare_digest(token.encode(), expected.encode()):
        raise ApiError(403, "forbidden", "this route needs the admin token")


TenantAccess = Annotated[Tenant, Depends(_tenant)]
"""A route parameter: the calling tenant (401 without a valid API key)."""

AdminAccess = Annotated[None, Depends(_admin)]
"""A route parameter: the caller holds the admin token (401/403 otherwise)."""
