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

A publisher may also wait for the message to be handled: ``publish(payload,
confirm_within=seconds)`` returns once every instance subscribed at that moment has run
its listeners on it (each confirms after handling), or when the time is up; it returns
how many did not confirm. Wire format: ``b"-" + payload`` or ``b"<ack id> " + payload``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
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

    async def publish(self, payload: bytes, *, confirm_within: float | None = None) -> int:
        """Send ``payload`` to every instance; raises StoreUnavailable if it cannot.

        With ``confirm_within``, wait until every instance that received it has handled
        it, at most that many seconds; return how many had not (0: all confirmed)."""
        if confirm_within is None:
            await self._publish(b"- " + payload)
            return 0
        ack_id = os.urandom(8).hex()
        receivers = await self._publish(ack_id.encode() + b" " + payload)
        return receivers - await self._await_confirmations(ack_id, receivers, confirm_within)

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
                async for message in self._listen(self._set_connected):
                    ack_id, _, payload = message.partition(b" ")
                    for listener in self._listeners:
                        listener.on_message(payload)
                    if ack_id != b"-":
                        await self._confirm(ack_id.decode())
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
    async def _publish(self, message: bytes) -> int:
        """Send ``message`` to every subscriber; return how many received it."""

    @abstractmethod
    async def _confirm(self, ack_id: str) -> None:
        """Tell the publisher of ``ack_id`` that this instance handled it."""

    @abstractmethod
    async def _await_confirmations(self, ack_id: str, expected: int, within: float) -> int:
        """Wait up to ``within`` seconds for ``expected`` confirmations; return how many came."""

    @abstractmethod
    def _listen(self, subscribed: Callable[[], None]) -> AsyncIterator[bytes]:
        """Subscribe, call ``subscribed()`` once in place, then yield payloads until the
        connection drops (by raising)."""


class MemoryHub:
    """The in-process medium several :class:`MemoryBroadcast` instances share."""

    def __init__(self) -> None:
        self.queues: set[asyncio.Queue[bytes]] = set()
        self.confirmations: dict[str, int] = {}
        self.confirmed = asyncio.Condition()


class MemoryBroadcast(Broadcast):
    """Broadcast inside one process (the embedded default)."""

    def __init__(self, hub: MemoryHub | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.hub = hub or MemoryHub()

    async def _publish(self, message: bytes) -> int:
        ack_id, _, _ = message.partition(b" ")
        if ack_id != b"-":
            self.hub.confirmations[ack_id.decode()] = 0
        for queue in self.hub.queues:
            queue.put_nowait(message)
        return len(self.hub.queues)

    async def _confirm(self, ack_id: str) -> None:
        async with self.hub.confirmed:
            if ack_id in self.hub.confirmations:  # else: its publisher stopped waiting
                self.hub.confirmations[ack_id] += 1
                self.hub.confirmed.notify_all()

    async def _await_confirmations(self, ack_id: str, expected: int, within: float) -> int:
        confirmations = self.hub.confirmations
        try:
            async with self.hub.confirmed:
                await asyncio.wait_for(
                    self.hub.confirmed.wait_for(lambda: confirmations.get(ack_id, 0) >= expected),
                    within,
                )
        except TimeoutError:
            pass
        return confirmations.pop(ack_id, 0)

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

    async def _publish(self, message: bytes) -> int:
        with unavailable_on_connection_errors():
            return int(await self.client.publish(self.channel, message))

    def _confirmations_key(self, ack_id: str) -> str:
        return f"{self.channel}:ack:{ack_id}"

    async def _confirm(self, ack_id: str) -> None:
        key = self._confirmations_key(ack_id)
        with unavailable_on_connection_errors():
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.rpush(key, 1)
                pipe.pexpire(key, 60_000)
                await pipe.execute()

    async def _await_confirmations(self, ack_id: str, expected: int, within: float) -> int:
        key = self._confirmations_key(ack_id)
        deadline = time.monotonic() + within
        confirmed = 0
        with unavailable_on_connection_errors():
            while confirmed < expected:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                # BLPOP's timeout has a resolution of milliseconds (Redis 6+).
                if await self.client.blpop([key], timeout=max(remaining, 0.001)) is None:
                    break
                confirmed += 1
            await self.client.delete(key)
        return confirmed

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
