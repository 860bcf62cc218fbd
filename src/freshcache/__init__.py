"""freshcache: cached data that stays fresh, for multi-tenant commerce backends."""

from freshcache.cache import Cache, CacheStats
from freshcache.core.events import Event, InvalidEvent, new_event, parse_event
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
from freshcache.core.plan import InvalidationPlan
from freshcache.core.policy import TIERS, Tier, TierError, tier
from freshcache.core.rules import RuleError, RuleSet
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
    "Event",
    "InvalidEvent",
    "InvalidKeyPart",
    "InvalidationPlan",
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
    "RuleError",
    "RuleSet",
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
    "new_event",
    "parse_event",
    "tier",
]
