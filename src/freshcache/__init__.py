"""freshcache: cached data that stays fresh, for multi-tenant commerce backends."""

from freshcache.cache import Cache, CacheStats
from freshcache.core.keys import (
    CacheKey,
    InvalidKeyPart,
    KeySpace,
    KeyTemplate,
    Namespace,
    Tag,
    TemplateError,
    commerce_keyspace,
)
from freshcache.core.policy import TIERS, Tier, TierError, tier
from freshcache.pipeline.bus import Bus, MemoryBus, Message, RedisStreamBus
from freshcache.serialization import JsonSerializer, Serializer
from freshcache.stores.base import Conflict, Entry, Store, StoreUnavailable
from freshcache.stores.memory import MemoryStore
from freshcache.stores.redis import RedisStore
from freshcache.write_behind import PendingWrite, WriteBehind, WriteBehindFlusher

__all__ = [
    "TIERS",
    "Bus",
    "Cache",
    "CacheKey",
    "CacheStats",
    "Conflict",
    "Entry",
    "InvalidKeyPart",
    "JsonSerializer",
    "KeySpace",
    "KeyTemplate",
    "MemoryBus",
    "MemoryStore",
    "Message",
    "Namespace",
    "PendingWrite",
    "RedisStore",
    "RedisStreamBus",
    "Serializer",
    "Store",
    "StoreUnavailable",
    "Tag",
    "TemplateError",
    "Tier",
    "TierError",
    "WriteBehind",
    "WriteBehindFlusher",
    "commerce_keyspace",
    "tier",
]
