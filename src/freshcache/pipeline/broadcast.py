"""Fan-out to every instance: invalidations reach each process's near cache.

The logic lives once in :class:`Broadcast` (listeners, reconnects, the "you may have
missed messages" signal); a transport only implements ``_publish`` and ``_listen``, after
python-socketio's pub/sub managers. Transports:

- :class:`MemoryBroadcast`: in-process (the embedded default, or several caches in one
  process sharing a :class:`MemoryHub`).
- :class:`RedisBroadcast`: Redis pub/sub, one channel, for several processes.

Pub/sub delivers at most once: a subscriber that loses its connection misses what was
published meanwhile. Listeners are therefore told when the connection drops and when it
is back (``on_disconnected`` / ``on_connected``); a near cache clears itself on both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import redis.asyncio as redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from freshcache.stores.base import StoreUnavailable
from freshcache.stores.redis import CONNECTION_ERRORS, unavailable_on_connection_errors

__all__ = ["Broadcast", "BroadcastListener", "MemoryBroadcast", "MemoryHub", "RedisBroadcast"]

logger = logging.getLogger(__name__)


class BroadcastListener(Protocol):
    """Receives what any instance broadcast, and the state of the subscription."""

    def on_message(self, payload: bytes) -> None: ...

    def on_connected(self) -> None:
        """The subscription is (again) in place: messages from now on will arrive."""
        ...

    def on_disconnected(self) -> None:
        """The subscription was lost: messages published from now on may be missed."""
        ...


class Broadcast(ABC):
    """Publishes payloads to every subscribed instance (itself included).

    ``start()`` begins listening in a background task and returns once subscribed;
    ``stop()`` ends it. ``reconnect_delay`` is the pause between attempts after a drop.
    """

    def __init__(self, *, reconnect_delay: float = 0.2) -> None:
        self.reconnect_delay = reconnect_delay
        self.disconnects = 0
        self._listeners: list[BroadcastListener] = []
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    def add_listener(self, listener: BroadcastListener) -> None:
        self._listeners.append(listener)

    @property
    def connected(self) -> bool:
        return self._subscribed.is_set()

    async def publish(self, payload: bytes) -> None:
        """Send ``payload`` to every instance; raises StoreUnavailable if it cannot."""
        await self._publish(payload)

    async def start(self, subscribe_within: float = 5.0) -> None:
        """Start listening; wait (up to ``subscribe_within`` seconds) until subscribed.

        If the transport is unreachable it keeps trying in the background; listeners are
        told once the subscription is in place."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), subscribe_within)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._set_disconnected(count=False)
        await self._close()

    async def _close(self) -> None:  # noqa: B027 - optional hook, most transports hold nothing
        """Release the transport's resources (after ``stop``)."""

    async def _run(self) -> None:
        while True:
            try:
                async for payload in self._listen(self._set_connected):
                    for listener in self._listeners:
                        listener.on_message(payload)
            except (StoreUnavailable, *CONNECTION_ERRORS) as error:
                logger.warning("broadcast subscription lost: %s", error)
            self._set_disconnected(count=True)
            await asyncio.sleep(self.reconnect_delay)

    def _set_connected(self) -> None:
        self._subscribed.set()
        for listener in self._listeners:
            listener.on_connected()

    def _set_disconnected(self, *, count: bool) -> None:
        if not self._subscribed.is_set():
            return
        self._subscribed.clear()
        if count:
            self.disconnects += 1
        for listener in self._listeners:
            listener.on_disconnected()

    @abstractmethod
    async def _publish(self, payload: bytes) -> None: ...

    @abstractmethod
    def _listen(self, subscribed: Callable[[], None]) -> AsyncIterator[bytes]:
        """Subscribe, call ``subscribed()`` once in place, then yield payloads until the
        connection drops (by raising)."""


class MemoryHub:
    """The in-process medium several :class:`MemoryBroadcast` instances share."""

    def __init__(self) -> None:
        self.queues: set[asyncio.Queue[bytes]] = set()


class MemoryBroadcast(Broadcast):
    """Broadcast inside one process (the embedded default)."""

    def __init__(self, hub: MemoryHub | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.hub = hub or MemoryHub()

    async def _publish(self, payload: bytes) -> None:
        for queue in self.hub.queues:
            queue.put_nowait(payload)

    async def _listen(self, subscribed: Callable[[], None]) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.hub.queues.add(queue)
        try:
            subscribed()
            while True:
                yield await queue.get()
        finally:
            self.hub.queues.discard(queue)


class RedisBroadcast(Broadcast):
    """Broadcast over Redis pub/sub on ``channel``.

    The client should have no socket read timeout (pub/sub connections idle for long);
    ``health_check_interval`` makes a dead connection noticed within that many seconds.
    """

    def __init__(
        self,
        client: redis.Redis,
        channel: str = "freshcache:invalidations",
        *,
        health_check_interval: float = 1.0,
        owns_client: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.client = client
        self.owns_client = owns_client
        self.channel = channel
        self.health_check_interval = health_check_interval

    @classmethod
    def from_url(
        cls, url: str, channel: str = "freshcache:invalidations", **options: Any
    ) -> RedisBroadcast:
        """Connect to ``url`` with a client of its own (closed by ``stop``); ``options``
        as for the constructor (``reconnect_delay``, ``health_check_interval``)."""
        client = redis.Redis.from_url(
            url, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0), decode_responses=False
        )
        return cls(client, channel, owns_client=True, **options)

    async def _close(self) -> None:
        if self.owns_client:
            await self.client.aclose()

    async def _publish(self, payload: bytes) -> None:
        with unavailable_on_connection_errors():
            await self.client.publish(self.channel, payload)

    async def _listen(self, subscribed: Callable[[], None]) -> AsyncIterator[bytes]:
        pubsub = self.client.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            confirmed = False
            while True:
                message = await pubsub.get_message(timeout=self.health_check_interval)
                if message is None:
                    await _ping(pubsub.ping)
                    continue
                if message["type"] == "subscribe":
                    if confirmed:
                        # The client reconnected by itself: messages may have been missed.
                        raise StoreUnavailable("pub/sub connection was re-established")
                    confirmed = True
                    subscribed()
                elif message["type"] == "message":
                    yield message["data"]
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]


async def _ping(ping: Callable[[], Awaitable[Any]]) -> None:
    # A PING on an idle subscription surfaces a dead connection as an error.
    await asyncio.wait_for(ping(), timeout=2.0)
