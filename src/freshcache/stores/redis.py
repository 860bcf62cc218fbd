"""Redis and Redis Cluster backend (redis.asyncio, hiredis).

Layout of one entry (all in one Cluster slot, thanks to the key's hash tag):

- ``<physical>``: ``<generation>|`` + 12-byte header (fresh-until ms, compute ms) + payload;
  its Redis TTL is the tier TTL plus the stale-while-revalidate window.
- ``<physical>|lease``: the fill lease token, with a short TTL.
- ``<namespace generation key>``: an integer, bumped with INCR; never expires.

Tag indexes are sorted sets (``<prefix>tag:{<tag>}``) of physical keys scored by the time
their entry expires at the latest, pruned as they are written to and expiring with their
last member. A purge deletes the members' entries and leases before it removes them from
the index, and removes only those not registered again meanwhile.

Each Lua script touches keys of one slot only, so the same code runs on a cluster.
"""

from __future__ import annotations

import contextlib
import functools
import struct
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, ParamSpec, TypeVar, cast

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from freshcache.core.keys import CacheKey, Namespace, Tag, lease_key
from freshcache.stores.base import Conflict, Entry, StoreUnavailable

__all__ = ["CONNECTION_ERRORS", "RedisStore", "unavailable_on_connection_errors"]

_HEADER = struct.Struct(">QI")

# KEYS: lease, generation, value. ARGV: token, lease ms, steal, unless stored ("1"/"0").
# Returns {generation} when the lease was taken, {-1} when someone else holds it, or
# {-2, value} when asked to check and a value of the current generation is stored.
_ACQUIRE = """
local generation = redis.call('GET', KEYS[2]) or '0'
if ARGV[3] == '1' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {tonumber(generation)}
end
if ARGV[4] == '1' then
  local value = redis.call('GET', KEYS[3])
  if value and string.sub(value, 1, #generation + 1) == generation .. '|' then
    return {-2, value}
  end
end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {-1}
end
return {tonumber(generation)}
"""

# KEYS: lease. ARGV: token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
"""

# KEYS: tag index. ARGV: member, until ms, now ms.
# Every registration strictly raises the member's score, so a purge that read the index
# before it can tell the registration is newer (see _FORGET_UNCHANGED).
_REGISTER = """
local until_ms = tonumber(ARGV[2])
local current = redis.call('ZSCORE', KEYS[1], ARGV[1])
if current and tonumber(current) >= until_ms then
  until_ms = tonumber(current) + 1
end
redis.call('ZADD', KEYS[1], until_ms, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
local ttl = until_ms - tonumber(ARGV[3])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
"""

# KEYS: value, lease, generation. ARGV: token, generation, body, ttl ms, invalidate ("1"/"0").
_COMMIT = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  if ARGV[5] == '1' then
    redis.call('DEL', KEYS[1], KEYS[2])
  end
  return 0
end
redis.call('DEL', KEYS[2])
local generation = redis.call('GET', KEYS[3]) or '0'
if generation ~= ARGV[2] then
  return 0
end
redis.call('SET', KEYS[1], generation .. '|' .. ARGV[3], 'PX', ARGV[4])
return 1
"""

# KEYS: value, lease, generation. ARGV: body, ttl ms.
_WRITE = """
local generation = redis.call('GET', KEYS[3]) or '0'
redis.call('SET', KEYS[1], generation .. '|' .. ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
"""

# KEYS: tag index. Returns [member, score, member, score, ...] with scores as Redis
# renders them, to compare with ZSCORE's later.
_MEMBERS = """
return redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
"""

# KEYS: tag index. ARGV: member, score, member, score, ... as read by _MEMBERS.
# Removes the members still registered with the score read: one registered again since
# (a newer fill, with a higher score) stays for the next purge.
_FORGET_UNCHANGED = """
local removed = 0
for i = 1, #ARGV, 2 do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return removed
"""

# Keys per DEL command and member/score pairs per _FORGET_UNCHANGED call: well below
# Lua's unpack limit and Redis' argument buffers.
_CHUNK = 1000

CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
"""What redis-py raises when the server cannot be reached or answers too late."""


@contextlib.contextmanager
def unavailable_on_connection_errors() -> Iterator[None]:
    """Raise :class:`StoreUnavailable` for a Redis that cannot be reached (every Redis
    adapter reports it the same way)."""
    try:
        yield
    except CONNECTION_ERRORS as error:
        raise StoreUnavailable(f"redis unavailable: {error}") from error


P = ParamSpec("P")
R = TypeVar("R")


def _unavailable_on_connection_error(
    method: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with unavailable_on_connection_errors():
            return await method(*args, **kwargs)

    return wrapper


def _encode(entry: Entry) -> bytes:
    header = _HEADER.pack(int(entry.fresh_until * 1000), int(entry.compute_seconds * 1000))
    return header + entry.payload


def _decode(raw: Any, generation: Any) -> Entry | None:
    """An entry read back, or None when absent or of an older generation."""
    if raw is None:
        return None
    separator = raw.index(b"|")
    if raw[:separator] != (generation or b"0"):
        return None
    fresh_ms, compute_ms = _HEADER.unpack_from(raw, separator + 1)
    return Entry(raw[separator + 1 + _HEADER.size :], fresh_ms / 1000, compute_ms / 1000)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisStore:
    """A store on Redis or Redis Cluster.

    Pass a ``redis.asyncio.Redis`` or ``RedisCluster`` client created with
    ``decode_responses=False``, or use :meth:`from_url`, which sets short timeouts and no
    retries so an unreachable server is reported at once (the cache then fails open).
    """

    def __init__(self, client: redis.Redis | RedisCluster) -> None:
        self.client = client
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._register = client.register_script(_REGISTER)
        self._commit = client.register_script(_COMMIT)
        self._write = client.register_script(_WRITE)
        self._members = client.register_script(_MEMBERS)
        self._forget_unchanged = client.register_script(_FORGET_UNCHANGED)

    @classmethod
    def from_url(
        cls, url: str, *, timeout: float = 1.0, max_connections: int = 64, **options: Any
    ) -> RedisStore:
        """Connect to ``redis://``, ``rediss://`` or ``unix://`` (or a cluster node with
        ``cluster=True`` in ``options``)."""
        cluster = options.pop("cluster", False)
        common: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
            "decode_responses": False,
            **options,
        }
        if cluster:
            return cls(RedisCluster.from_url(url, **common))
        return cls(redis.Redis.from_url(url, max_connections=max_connections, **common))

    async def read(self, key: CacheKey) -> Entry | None:
        # The hottest path: errors translated inline rather than by another coroutine frame.
        try:
            if key.namespace is None:
                return _decode(await self.client.get(key.physical), None)
            generation, raw = await self.client.mget(key.generation_key, key.physical)
        except CONNECTION_ERRORS as error:
            raise StoreUnavailable(f"redis unavailable: {error}") from error
        return _decode(raw, generation)

    @_unavailable_on_connection_error
    async def read_many(self, keys: Sequence[CacheKey]) -> list[Entry | None]:
        async with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                if key.namespace is None:
                    pipe.get(key.physical)
                else:
                    pipe.mget(key.generation_key, key.physical)
            replies = await pipe.execute()
        return [
            _decode(reply, None) if key.namespace is None else _decode(reply[1], reply[0])
            for key, reply in zip(keys, replies, strict=True)
        ]

    @_unavailable_on_connection_error
    async def acquire_lease(
        self,
        key: CacheKey,
        token: str,
        lease_seconds: float,
        *,
        steal: bool = False,
        unless_stored: bool = False,
    ) -> int | Entry | None:
        reply = await self._acquire(
            keys=[key.lease_key, key.generation_key, key.physical],
            args=[token, _ms(lease_seconds), "1" if steal else "0", "1" if unless_stored else "0"],
        )
        status = int(reply[0])
        if status == -1:
            return None
        if status == -2:
            return _decode(reply[1], reply[1].partition(b"|")[0])
        return status

    @_unavailable_on_connection_error
    async def release_lease(self, key: CacheKey, token: str) -> None:
        await self._release(keys=[key.lease_key], args=[token])

    @_unavailable_on_connection_error
    async def register_tags(self, items: Sequence[tuple[CacheKey, float]]) -> None:
        registrations = [(key, tag, until) for key, until in items for tag in key.tags]
        if not registrations:
            return
        now_ms = int(time.time() * 1000)
        if len(registrations) == 1:
            key, tag, until = registrations[0]
            await self._register(
                keys=[tag.physical], args=[key.physical, max(_ms(until), now_ms + 1), now_ms]
            )
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for key, tag, until in registrations:
                await self._register(
                    keys=[tag.physical],
                    args=[key.physical, max(_ms(until), now_ms + 1), now_ms],
                    client=cast(Any, pipe),  # redis-py's stubs omit pipelines
                )
            await pipe.execute()

    @_unavailable_on_connection_error
    async def commit(
        self,
        key: CacheKey,
        token: str,
        generation: int,
        entry: Entry,
        ttl: float,
        conflict: Conflict = Conflict.DROP,
    ) -> bool:
        stored = await self._commit(
            keys=[key.physical, key.lease_key, key.generation_key],
            args=[
                token,
                str(generation),
                _encode(entry),
                _ms(ttl),
                "1" if conflict is Conflict.INVALIDATE else "0",
            ],
        )
        return bool(stored)

    @_unavailable_on_connection_error
    async def write(self, items: Sequence[tuple[CacheKey, Entry, float]]) -> None:
        if len(items) == 1:
            key, entry, ttl = items[0]
            await self._write(
                keys=[key.physical, key.lease_key, key.generation_key],
                args=[_encode(entry), _ms(ttl)],
            )
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for key, entry, ttl in items:
                await self._write(
                    keys=[key.physical, key.lease_key, key.generation_key],
                    args=[_encode(entry), _ms(ttl)],
                    client=cast(Any, pipe),  # redis-py's stubs omit pipelines
                )
            await pipe.execute()

    @_unavailable_on_connection_error
    async def delete(self, keys: Sequence[CacheKey]) -> None:
        if not keys:
            return
        # Unregister from the tag indexes strictly before deleting the lease: a fill that
        # registers in between still holds a lease the delete then cancels, whereas the
        # other order could erase the registration of a fill that goes on to commit.
        if any(key.tags for key in keys):
            async with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    for tag in key.tags:
                        pipe.zrem(tag.physical, key.physical)
                await pipe.execute()
        async with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.delete(key.physical, key.lease_key)
            await pipe.execute()

    @_unavailable_on_connection_error
    async def purge_tags(self, tags: Sequence[Tag]) -> int:
        # Members leave the index only after their entries and leases are gone: a purge
        # running concurrently for a later change must still find them, or it could
        # return while a fill that read the older data is yet to be cancelled.
        snapshots = [(tag, await self._members(keys=[tag.physical])) for tag in tags]
        members = {member for _, flat in snapshots for member in flat[::2]}
        doomed = [name for member in members for name in (member, lease_key(member.decode()))]
        for start in range(0, len(doomed), _CHUNK):
            await self.client.delete(*doomed[start : start + _CHUNK])
        for tag, flat in snapshots:
            for start in range(0, len(flat), 2 * _CHUNK):
                await self._forget_unchanged(
                    keys=[tag.physical], args=flat[start : start + 2 * _CHUNK]
                )
        return len(members)

    @_unavailable_on_connection_error
    async def bump(self, namespaces: Sequence[Namespace]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for namespace in namespaces:
                pipe.incr(namespace.generation_key)
            await pipe.execute()

    @_unavailable_on_connection_error
    async def tag_index_size(self, tag: Tag) -> int:
        return int(await self.client.zcard(tag.physical))

    async def close(self) -> None:
        await self.client.aclose()
