"""The real-time layer: Socket.IO rooms and SSE streams fed from bounded room histories.

Start with :class:`Realtime`; the modules hold the parts (``history``: offsets and
replay; ``fanout``: delivery inside an instance; ``rooms``: Socket.IO; ``sse``: dashboard
streams; ``collector``: keeping garbage collection out of the delivery path).
"""

from freshcache.realtime.collector import CollectorFreezer
from freshcache.realtime.fanout import RealtimeStats
from freshcache.realtime.history import (
    MemoryHistory,
    RedisHistory,
    Replay,
    RoomHistory,
    RoomMessage,
)
from freshcache.realtime.layer import LIVE_SCRIPT, Realtime, live_script
from freshcache.realtime.rooms import SLOW_CONSUMER
from freshcache.realtime.sse import sse_frame

__all__ = [
    "LIVE_SCRIPT",
    "SLOW_CONSUMER",
    "CollectorFreezer",
    "MemoryHistory",
    "Realtime",
    "RealtimeStats",
    "RedisHistory",
    "Replay",
    "RoomHistory",
    "RoomMessage",
    "live_script",
    "sse_frame",
]
