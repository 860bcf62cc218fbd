"""The service's real-time layer: :mod:`freshcache.realtime` fed by the change pipeline.

Socket.IO at ``/socket.io/`` (``auth: {token}``, a tenant's API key; rooms
``product:<id>`` and ``order:<id>`` of that tenant only, each answered with a snapshot in
the shape of its event), the dashboard stream at ``GET /api/dashboard/live-stream`` (the
``GET /api/dashboard`` figures, same cache entry, every ``FRESHCACHE_LIVE_INTERVAL``
seconds; ``newOrder`` and ``lowStock`` at once) and ``/static/freshcache-live.js``.

Publishing. ``stockUpdate`` ``{productId, newStock, timestamp}`` on every stock change,
``statusUpdate`` ``{orderId, status, trackingNumber, estimatedDelivery}`` on every order
change: the invalidation worker that handles the change's outbox event publishes them
(:meth:`LiveUpdates.publish_changes`, a worker listener). The outbox triggers see every
writer (the API, an order, ``psql``) and the consumer group hands each event to one
worker, so each change is published once, whichever instance made it, and reaches the
clients of every instance. Routes publish nothing themselves: a second publisher would
bring duplicates and values out of order.

Order and duplicates. Several relays and workers (one each per instance) may handle two
changes of one product at the same moment, and a failed batch is handled again. So the
publishing of a row's changes is serialised (a short lock in Redis; in the embedded
default one worker does everything), and each change carries the time the database made
it (taken while the database held the row's lock: it grows with every change of the
row). A change older than the one last published, or the same one again, is dropped: a
client may skip an intermediate value that was overtaken, never see an older one after
a newer. One duplicate remains possible: a publish that went through as Redis died,
unseen by its worker, is published again when the batch is retried.

Latency: a change is published once the outbox relay has moved it to the bus. On
PostgreSQL the relay is woken at each commit; on SQLite (the embedded default) it polls,
so expect up to ``relay_poll_interval`` (0.5 s by default).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import redis.asyncio as redis
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import BaseRoute, Route

from freshcache.core.events import Event
from freshcache.marketplace.auth import Tenant, TenantDirectory
from freshcache.marketplace.records import iso_date, price, timestamp
from freshcache.marketplace.routes import reports
from freshcache.marketplace.runtime import Runtime
from freshcache.marketplace.schema import orders, product_stock
from freshcache.marketplace.settings import Settings
from freshcache.realtime import MemoryHistory, Realtime, RedisHistory
from freshcache.realtime.rooms import tenant_channel
from freshcache.stores.base import StoreUnavailable
from freshcache.stores.redis import unavailable_on_connection_errors

__all__ = [
    "STREAM_PATH",
    "ChangeMark",
    "LiveSettings",
    "LiveStats",
    "LiveUpdates",
    "MemoryTurns",
    "Publish",
    "RedisTurns",
    "RowTurns",
]

logger = logging.getLogger(__name__)

STREAM_PATH = "/api/dashboard/live-stream"
"""Where the dashboard stream is served (the seed's endpoint)."""
_MAX_TOKEN_LENGTH = 256
_CLOCK_SKEW_MICROSECONDS = 60_000_000


@dataclass(frozen=True)
class LiveSettings:
    """How the real-time layer runs.

    - ``interval``: seconds between the dashboard stream's figures
      (``FRESHCACHE_LIVE_INTERVAL``, default 30, the seed's).
    - ``history``: messages kept per room (and per tenant's dashboard stream) for
      clients that reconnect (``FRESHCACHE_LIVE_HISTORY``, default 1000); a client that
      missed more gets a fresh snapshot instead.
    """

    interval: float = 30.0
    history: int = 1000

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LiveSettings:
        """Settings from ``FRESHCACHE_LIVE_*`` variables (``os.environ`` by default)."""
        env = os.environ if environ is None else environ
        defaults = cls()
        return cls(
            interval=_number(env, "FRESHCACHE_LIVE_INTERVAL", float, defaults.interval),
            history=_number(env, "FRESHCACHE_LIVE_HISTORY", int, defaults.history),
        )

    def __post_init__(self) -> None:
        if not self.interval > 0:
            raise ValueError(f"FRESHCACHE_LIVE_INTERVAL must be > 0, got {self.interval}")
        if self.history < 1:
            raise ValueError(f"FRESHCACHE_LIVE_HISTORY must be >= 1, got {self.history}")


Number = TypeVar("Number", int, float)


def _number(env: Mapping[str, str], name: str, kind: type[Number], default: Number) -> Number:
    text = env.get(name)
    if not text:
        return default
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{name}: expected a number, got {text!r}") from None


@dataclass
class LiveStats:
    """Changes this instance's worker did not publish: ``stale`` (older than, or the
    same as, the change last published for the row) and ``unusable`` (an event without
    the fields a message needs, or dated ahead of this clock: an application event)."""

    stale: int = 0
    unusable: int = 0


# -- publishing one row's changes in order ---------------------------------------------


@dataclass(frozen=True, slots=True)
class ChangeMark:
    """A change as last published for a row: when the database made it (microseconds
    since the epoch), its event id, and the stock it set (stock rows only)."""

    changed_at: int
    event_id: str
    stock: int | None = None

    def supersedes(self, previous: ChangeMark | None) -> bool:
        """Whether this change may follow ``previous``: neither the same event again nor
        an older change. Equal times are let through: SQLite's clock counts milliseconds,
        and there a single worker publishes in order anyway."""
        if previous is None:
            return True
        return self.event_id != previous.event_id and self.changed_at >= previous.changed_at

    def encode(self) -> str:
        stock = "" if self.stock is None else str(self.stock)
        return f"{self.changed_at}:{stock}:{self.event_id}"

    @classmethod
    def decode(cls, text: bytes | None) -> ChangeMark | None:
        if text is None:
            return None
        changed_at, stock, event_id = text.decode().split(":", 2)
        return cls(int(changed_at), event_id, int(stock) if stock else None)


Publish = Callable[[ChangeMark | None], Awaitable[None]]
"""Publishes a row's change, given the row's previous mark."""


class RowTurns(ABC):
    """Takes turns at publishing each row's changes, across every worker."""

    @abstractmethod
    async def publish(self, row: str, mark: ChangeMark, publish: Publish) -> bool:
        """Run ``publish(previous mark)`` if ``mark`` supersedes the row's last mark, with
        no other worker publishing for ``row`` meanwhile; the row's mark becomes ``mark``
        once it succeeded. False: the change is stale, nothing was published."""

    async def close(self) -> None:  # noqa: B027 - optional hook, the memory turns hold nothing
        """Release connections."""


class MemoryTurns(RowTurns):
    """The marks of the ``max_rows`` rows changed last, in this process: for the embedded
    default, whose one worker publishes every change in turn."""

    def __init__(self, max_rows: int = 100_000) -> None:
        self.max_rows = max_rows
        self._marks: OrderedDict[str, ChangeMark] = OrderedDict()

    async def publish(self, row: str, mark: ChangeMark, publish: Publish) -> bool:
        previous = self._marks.get(row)
        if not mark.supersedes(previous):
            return False
        await publish(previous)
        self._marks[row] = mark
        self._marks.move_to_end(row)
        if len(self._marks) > self.max_rows:
            self._marks.popitem(last=False)
        return True


# Take the row's lock and read its mark. KEYS: lock, mark. ARGV: token, lock milliseconds.
_TAKE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, redis.call('GET', KEYS[2])}
end
return {0}
"""

# Release the lock if it is still ours, recording the new mark ('' keeps the old one).
# KEYS: lock, mark. ARGV: token, new mark, mark seconds.
_GIVE_BACK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' then redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3]) end
redis.call('DEL', KEYS[1])
return 1
"""


class RedisTurns(RowTurns):
    """Row locks and marks in Redis, shared by every instance's worker.

    A lock lasts ``lock_seconds`` at most (a worker that dies holding one delays that
    row's next change by as much); a worker waits up to ``wait_seconds`` for it, then
    fails its batch, which is retried. Marks expire after ``mark_seconds`` unchanged.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "fc:",
        lock_seconds: float = 5.0,
        wait_seconds: float = 10.0,
        mark_seconds: int = 86_400,
    ) -> None:
        self.prefix = prefix
        self.lock_seconds = lock_seconds
        self.wait_seconds = wait_seconds
        self.mark_seconds = mark_seconds
        self.client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0)
        self._take = self.client.register_script(_TAKE)
        self._give_back = self.client.register_script(_GIVE_BACK)

    async def publish(self, row: str, mark: ChangeMark, publish: Publish) -> bool:
        # One hash slot for both keys (Redis Cluster runs a script on one node).
        keys = [f"{self.prefix}live:{{{row}}}:lock", f"{self.prefix}live:{{{row}}}:mark"]
        token = secrets.token_hex(8)
        previous = await self._wait_for_turn(row, keys, token)
        published = False
        try:
            if mark.supersedes(previous):
                await publish(previous)
                published = True
        finally:
            await self._give_back_turn(row, keys, token, mark if published else None)
        return published

    async def _give_back_turn(
        self, row: str, keys: list[str], token: str, mark: ChangeMark | None
    ) -> None:
        # Never raises: a lock left behind expires by itself, and a change published but
        # not recorded is merely not recognised if the same event comes again.
        try:
            with unavailable_on_connection_errors():
                kept = await self._give_back(
                    keys=keys,
                    args=[token, "" if mark is None else mark.encode(), self.mark_seconds],
                )
        except StoreUnavailable as error:
            logger.warning("could not release the live-update lock of %s: %s", row, error)
            return
        if not kept:
            logger.warning("the live-update lock of %s expired while publishing", row)

    async def _wait_for_turn(self, row: str, keys: list[str], token: str) -> ChangeMark | None:
        deadline = time.monotonic() + self.wait_seconds
        while True:
            with unavailable_on_connection_errors():
                taken = await self._take(keys=keys, args=[token, int(self.lock_seconds * 1000)])
            if taken[0] == 1:
                return ChangeMark.decode(taken[1])
            if time.monotonic() > deadline:
                raise TimeoutError(f"the live updates of {row} stayed locked")
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        await self.client.aclose()


# -- the layer --------------------------------------------------------------------------


class LiveUpdates:
    """The service's Socket.IO rooms, dashboard stream and change publishing.

    In ``create_app``: build it, :meth:`mount` it, hand :meth:`publish_changes` to the
    runtime's worker as a listener, :meth:`bind` the runtime before starting it, and
    :meth:`start` / :meth:`stop` it in the lifespan.
    """

    def __init__(self, settings: Settings, options: LiveSettings | None = None) -> None:
        self.settings = settings
        self.options = options or LiveSettings()
        self.stats = LiveStats()
        self.turns: RowTurns
        if settings.redis_url is None:
            history: MemoryHistory | RedisHistory = MemoryHistory(max_messages=self.options.history)
            self.turns = MemoryTurns()
        else:
            history = RedisHistory(
                settings.redis_url,
                max_messages=self.options.history,
                prefix=f"{settings.key_prefix}rt:",
                channel=f"{settings.key_prefix}realtime",
            )
            self.turns = RedisTurns(settings.redis_url, prefix=settings.key_prefix)
        self.realtime = Realtime(
            authenticate=self._authenticate,
            authorize=self._authorize,
            snapshot=self._snapshot,
            metrics=self._dashboard_figures,
            history=history,
            metrics_interval=self.options.interval,
        )
        self._runtime: Runtime | None = None
        self._directory: TenantDirectory | None = None
        self._app: Starlette | None = None
        self._stream_route: BaseRoute | None = None
        self._handlers: dict[str, Callable[[Event], Awaitable[None]]] = {
            "stock.changed": self._stock_changed,
            "order.created": self._order_changed,
            "order.updated": self._order_changed,
        }

    def mount(self, app: Starlette) -> None:
        """Add Socket.IO, the dashboard stream and the browser module to ``app``."""
        routes = self.realtime.routes(sse_path=STREAM_PATH)
        app.router.routes[0:0] = routes
        self._app = app
        self._stream_route = next(
            route for route in routes if isinstance(route, Route) and route.path == STREAM_PATH
        )

    def bind(self, runtime: Runtime, directory: TenantDirectory) -> None:
        """The instance's runtime (database, cache) and API keys; before its worker starts."""
        self._runtime = runtime
        self._directory = directory

    async def start(self) -> None:
        await self.realtime.start()

    async def stop(self) -> None:
        """Close every client's connection and stream, then the connections to Redis."""
        try:
            await self.realtime.stop()
        finally:
            await self.turns.close()

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise RuntimeError("LiveUpdates.bind(runtime, directory) was not called")
        return self._runtime

    # -- clients ------------------------------------------------------------------------

    async def _authenticate(self, token: str) -> str | None:
        if self._directory is None or len(token) > _MAX_TOKEN_LENGTH:
            return None
        tenant = await self._directory.find(token)
        return None if tenant is None else tenant.id

    async def _authorize(self, tenant: str, room: str) -> bool:
        kind, _, identifier = room.partition(":")
        if kind == "product":
            query = select(product_stock.c.product_id).where(
                product_stock.c.product_id == identifier, product_stock.c.tenant_id == tenant
            )
        else:
            query = select(orders.c.id).where(
                orders.c.id == identifier, orders.c.tenant_id == tenant
            )
        async with self.runtime.database.read() as connection:
            return await connection.scalar(query) is not None

    async def _snapshot(self, tenant: str, room: str) -> dict[str, Any]:
        """A joining client's state of the room, in the shape of the room's event."""
        kind, _, identifier = room.partition(":")
        if kind == "product":
            async with self.runtime.database.read() as connection:
                stock = await connection.scalar(
                    select(product_stock.c.quantity).where(
                        product_stock.c.product_id == identifier,
                        product_stock.c.tenant_id == tenant,
                    )
                )
            return {"productId": identifier, "newStock": stock, "timestamp": _milliseconds()}
        order = await self._order(tenant, identifier)
        return {
            "orderId": identifier,
            "status": None if order is None else order.status,
            "trackingNumber": None if order is None else order.tracking_number,
            "estimatedDelivery": None if order is None else iso_date(order.estimated_delivery),
        }

    async def _dashboard_figures(self, tenant: str) -> dict[str, Any]:
        """``GET /api/dashboard``'s figures, from the route itself: the same cache entry
        (computed at most once per short-tier TTL for the route and every stream alike)
        and hit/miss counted under the stream's endpoint."""
        if self._app is None:
            raise RuntimeError("LiveUpdates.mount(app) was not called")
        scope = {
            "type": "http",
            "app": self._app,
            "method": "GET",
            "path": "/api/dashboard",
            "headers": [],
            "query_string": b"",
            "state": {},
            "route": self._stream_route,
        }
        return await reports.dashboard(Request(scope), Tenant(tenant, ""))

    # -- publishing (the worker's listener) ---------------------------------------------

    async def publish_changes(self, events: Sequence[Event]) -> None:
        """Publish the live messages of a batch of events whose invalidations are applied
        (an :data:`~freshcache.pipeline.worker.EventListener`). Raises when the history
        cannot be reached, which fails the batch: it is retried, and what was published
        before the failure is recognised and not published again (unless the failure
        hid that it went through)."""
        # An event dated ahead (an application's clock, not the database's) would make
        # its row's real changes look older than it for as long as its mark is kept.
        latest = _microseconds(datetime.now(UTC)) + _CLOCK_SKEW_MICROSECONDS
        for event in events:
            handler = self._handlers.get(event.event_type)
            if handler is None:
                continue
            if _microseconds(event.timestamp) > latest:
                self._unusable(event, "dated in the future")
            else:
                await handler(event)

    def _row(self, event: Event, kind: str, field: str) -> tuple[str, str] | None:
        """The id the event names in ``field`` and the key of that ``kind`` row (its room,
        tenant-scoped), or None when it names no room a client could subscribe to."""
        identifier = event.fields.get(field)
        room = f"{kind}:{identifier}"
        if not isinstance(identifier, str) or not self.realtime.rooms.is_room(room):
            return None
        try:
            return identifier, tenant_channel(event.tenant_id, room)
        except ValueError:
            return None

    async def _stock_changed(self, event: Event) -> None:
        """``stockUpdate``, and ``lowStock`` when the stock fell to the dashboard's
        low-stock figure or below."""
        row = self._row(event, "product", "productId")
        stock = event.fields.get("newStock")
        if row is None or isinstance(stock, bool) or not isinstance(stock, int):
            self._unusable(event)
            return
        product_id, key = row
        tenant = event.tenant_id
        changed_at = _microseconds(event.timestamp)

        async def publish(previous: ChangeMark | None) -> None:
            await self.realtime.publish_stock_update(
                tenant, product_id, stock, timestamp=changed_at // 1000
            )
            fell = previous is None or previous.stock is None or stock < previous.stock
            if stock <= reports.LOW_STOCK and fell:
                alert = {
                    "productId": product_id,
                    "newStock": stock,
                    "threshold": reports.LOW_STOCK,
                    "timestamp": changed_at // 1000,
                }
                await self.realtime.publish_tenant_event(tenant, "lowStock", alert)

        await self._in_turn(key, ChangeMark(changed_at, event.event_id, stock), publish)

    async def _order_changed(self, event: Event) -> None:
        row = self._row(event, "order", "orderId")
        if row is None:
            self._unusable(event)
            return
        order_id, key = row
        tenant = event.tenant_id

        async def publish(previous: ChangeMark | None) -> None:
            # Read in turn: each publish of the order sees a state at least as new as the
            # one before.
            order = await self._order(tenant, order_id)
            if order is None:
                return
            if event.event_type == "order.created":
                placed = {
                    "orderId": order_id,
                    "status": order.status,
                    "total": price(order.total_cents),
                    "createdAt": timestamp(order.created_at),
                }
                await self.realtime.publish_tenant_event(tenant, "newOrder", placed)
            else:
                await self.realtime.publish_status_update(
                    tenant,
                    order_id,
                    order.status,
                    tracking_number=order.tracking_number,
                    estimated_delivery=iso_date(order.estimated_delivery),
                )

        mark = ChangeMark(_microseconds(event.timestamp), event.event_id)
        await self._in_turn(key, mark, publish)

    async def _in_turn(self, key: str, mark: ChangeMark, publish: Publish) -> None:
        if not await self.turns.publish(key, mark, publish):
            self.stats.stale += 1

    def _unusable(self, event: Event, reason: str = "ids or values missing") -> None:
        self.stats.unusable += 1
        logger.warning("no live update for %s %s: %s", event.event_type, event.event_id, reason)

    async def _order(self, tenant: str, order_id: str) -> Any:
        query = select(
            orders.c.status,
            orders.c.tracking_number,
            orders.c.estimated_delivery,
            orders.c.total_cents,
            orders.c.created_at,
        ).where(orders.c.id == order_id, orders.c.tenant_id == tenant)
        async with self.runtime.database.read() as connection:
            return (await connection.execute(query)).first()


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _microseconds(moment: datetime) -> int:
    # Integer arithmetic: a float of today's microseconds is not exact.
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _milliseconds() -> int:
    return int(time.time() * 1000)
