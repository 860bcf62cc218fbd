"""Prometheus metrics of one service instance, under the contract of
:mod:`freshcache.observability.names` (prometheus-client, a registry per app).

- ``freshcache_cache_requests_total{endpoint, result}``: cached reads by route, ``hit``,
  ``stale`` (served at once while refreshed in the background) or ``miss`` (the reader
  waited for a load), as ``Cache.read_through`` reports them.
- ``freshcache_http_request_duration_seconds{endpoint, method, cache}``: latency, with
  ``cache`` ``hit``, ``miss`` or ``none`` (a route that does not cache), so cached and
  uncached latencies are two series of one histogram.
- ``freshcache_cache_memory_bytes`` and ``freshcache_cache_evictions_total``: Redis's
  ``used_memory`` and ``evicted_keys``, read (``INFO``, two round trips) when
  ``/metrics`` is scraped; with the memory store, its evictions and
  ``freshcache_cache_entries`` (it keeps no byte count).
- ``freshcache_invalidations_total{source, kind}``: the targets of the plans the
  invalidation worker applied, once per key, tag and namespace of each batch (merged
  targets are ``freshcache_invalidations_coalesced_total``). The worker is where an
  invalidation is counted: the consumer group hands each change to one worker of the
  deployment, whereas a write route applies its plan too, before responding, and the
  worker applies it again (those are ``freshcache_write_invalidations_total``). ``source``
  is ``event`` for an event that names its ``affectedCaches`` (the application events of
  the specification's JSON form) and ``outbox`` for the others (the outbox triggers'
  events name none).
- Real time, by ``transport``: open connections, connections opened and closed (with the
  reason), messages delivered or dropped, and the delivery latency; see
  :class:`RealtimeCounts`.
- ``freshcache_dashboard_refreshes_total``: dashboards the analytics job pushed.
- The counters of the cache, warming, the worker and the outbox relay.

Labels are bounded: ``endpoint`` is the route's template (``/api/products/{product_id}``),
never a concrete path, and ``unmatched`` for requests no route took.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from freshcache.core.events import Event, InvalidEvent
from freshcache.observability import (
    CACHE_EVICTIONS,
    CACHE_MEMORY_BYTES,
    CACHE_REQUESTS,
    DASHBOARD_REFRESHES,
    HTTP_REQUEST_DURATION,
    INVALIDATIONS,
    INVALIDATIONS_COALESCED,
    REALTIME_CONNECTIONS,
    REALTIME_CONNECTS,
    REALTIME_DELIVERY,
    REALTIME_DISCONNECTS,
    REALTIME_MESSAGES,
    CacheResult,
    DeliveryResult,
    DisconnectReason,
    InvalidationKind,
    InvalidationSource,
    Transport,
)
from freshcache.realtime import SLOW_CONSUMER, Realtime
from freshcache.realtime.history import decode_message, offset_position
from freshcache.realtime.sse import TENANT_STREAM
from freshcache.stores.base import StoreUnavailable
from freshcache.stores.memory import MemoryStore
from freshcache.stores.redis import RedisStore, unavailable_on_connection_errors

if TYPE_CHECKING:
    from freshcache.marketplace.analytics import DashboardAnalytics
    from freshcache.marketplace.runtime import Runtime

__all__ = [
    "CACHE_RESULT_STATE",
    "Metrics",
    "MetricsMiddleware",
    "RealtimeCounts",
    "endpoint_of",
    "socketio_reason",
]

CACHE_RESULT_STATE = "freshcache_cache_result"
"""Where a cached route records ``hit`` or ``miss`` in the request state."""

METRICS_PATH = "/metrics"

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# python-socketio's disconnect reasons. A clean close of the transport is how a browser
# leaves a page; a ping timeout is a connection that broke without a close.
_SOCKETIO_REASONS = {
    "client disconnect": DisconnectReason.CLIENT,
    "transport close": DisconnectReason.CLIENT,
    "server disconnect": DisconnectReason.SERVER,
    "ping timeout": DisconnectReason.TRANSPORT_LOST,
    "transport error": DisconnectReason.ERROR,
    SLOW_CONSUMER: DisconnectReason.SLOW_CONSUMER,
}
_EVICTED = b"evicted"


def endpoint_of(scope: Scope) -> str:
    """The template of the route that handled ``scope``, or ``unmatched``."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


def socketio_reason(reason: str) -> DisconnectReason:
    """The contract's reason for a Socket.IO disconnect reason (``error`` if unknown)."""
    return _SOCKETIO_REASONS.get(reason, DisconnectReason.ERROR)


@dataclass
class RealtimeCounts:
    """The SSE streams of this instance, seen from the HTTP side (every response of type
    ``text/event-stream``): streams opened, closed by reason, event frames written
    (heartbeat comments aside) and streams evicted as slow consumers.

    Socket.IO's figures come from the real-time layer's stats: connections opened are
    the open ones plus those closed, closed ones by reason, less the SSE evictions the
    layer counts with them (it counts a slow consumer's disconnect for both transports
    under one reason). Socket.IO's messages delivered and dropped come from the layer's
    per-transport counts (see ``_RuntimeCollector``).
    """

    sse_connects: int = 0
    sse_disconnects: dict[DisconnectReason, int] = field(default_factory=dict)
    sse_frames: int = 0
    sse_evicted: int = 0

    def sse_closed(self, reason: DisconnectReason) -> None:
        self.sse_disconnects[reason] = self.sse_disconnects.get(reason, 0) + 1


@dataclass
class _StoreFigures:
    """The cache store's memory and evictions as last read (Redis) or ``None``."""

    memory_bytes: float | None = None
    evictions: float | None = None


class Metrics:
    """The instance's metrics, in a registry of its own (several apps may share a
    process, e.g. in tests). :meth:`attach` the runtime before starting it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.cache_requests = CACHE_REQUESTS.counter(self.registry)
        self.request_duration = HTTP_REQUEST_DURATION.histogram(self.registry)
        self.invalidations = INVALIDATIONS.counter(self.registry)
        for source in InvalidationSource:
            for kind in InvalidationKind:
                self.invalidations.labels(source, kind)  # rates need the zero sample
        self.realtime_delivery = REALTIME_DELIVERY.histogram(self.registry)
        self.realtime_counts = RealtimeCounts()
        self.store_figures = _StoreFigures()
        self._runtime: Runtime | None = None
        self._collector: _RuntimeCollector | None = None
        self._clocked: set[int] = set()

    def attach(
        self,
        runtime: Runtime,
        *,
        realtime: Realtime | None = None,
        analytics: DashboardAnalytics | None = None,
    ) -> None:
        """Export ``runtime``'s counters (and the real-time layer's, the analytics
        job's) too, until :meth:`detach`; count the invalidations its worker applies."""
        self.detach()
        self._runtime = runtime
        self._collector = _RuntimeCollector(self, runtime, realtime, analytics)
        self.registry.register(self._collector)
        if realtime is not None and id(realtime) not in self._clocked:
            # A subscription listener cannot be removed: add it once per layer.
            self._clocked.add(id(realtime))
            realtime.fanout.subscription.add_listener(_DeliveryClock(self, realtime))

    def detach(self) -> None:
        if self._collector is not None:
            self.registry.unregister(self._collector)
            self._collector = None
        self._runtime = None

    def record_cache_result(self, request: Request, result: CacheResult) -> None:
        self.cache_requests.labels(endpoint_of(request.scope), result).inc()
        setattr(request.state, CACHE_RESULT_STATE, str(result))

    async def count_invalidations(self, events: Sequence[Event]) -> None:
        """A worker listener (:data:`~freshcache.pipeline.worker.EventListener`): count
        the targets of a batch's applied plans, each target once per batch."""
        runtime = self._runtime
        if runtime is None:
            return
        counted: dict[tuple[InvalidationSource, InvalidationKind], int] = {}
        seen: set[tuple[InvalidationKind, str]] = set()
        for event in events:
            try:
                plan = runtime.rules.plan(event)
            except InvalidEvent:
                continue  # the worker dead-lettered it: nothing was applied
            source = (
                InvalidationSource.EVENT if event.affected_caches else InvalidationSource.OUTBOX
            )
            targets = (
                *((InvalidationKind.KEY, key.physical) for key in plan.keys),
                *((InvalidationKind.TAG, tag.physical) for tag in plan.tags),
                *((InvalidationKind.NAMESPACE, ns.generation_key) for ns in plan.namespaces),
            )
            for target in targets:
                if target not in seen:
                    seen.add(target)
                    counted[(source, target[0])] = counted.get((source, target[0]), 0) + 1
        for (source, kind), count in counted.items():
            self.invalidations.labels(source, kind).inc(count)

    async def refresh_store_figures(self) -> None:
        """Read the Redis store's memory and evictions (``INFO``), for the next scrape;
        an unreachable Redis leaves them out of it."""
        runtime = self._runtime
        store = None if runtime is None else runtime.cache.store
        if not isinstance(store, RedisStore):
            return
        try:
            with unavailable_on_connection_errors():
                memory = await store.client.info("memory")
                stats = await store.client.info("stats")
        except StoreUnavailable:
            self.store_figures = _StoreFigures()
            return
        self.store_figures = _StoreFigures(
            memory_bytes=_info_total(memory, "used_memory"),
            evictions=_info_total(stats, "evicted_keys"),
        )


def _info_total(info: Mapping[str, Any], field_name: str) -> float | None:
    """``field_name`` of an ``INFO`` reply, summed over the nodes of a cluster's reply
    (which maps each node to its own)."""
    if field_name in info:
        return float(info[field_name])
    values = [node[field_name] for node in info.values() if isinstance(node, Mapping)]
    return float(sum(values)) if values else None


class _DeliveryClock:
    """Listens to the real-time fan-out after the layer's own listener: each message
    for a room with subscribers here has been queued for its connections, and the time
    since its publication (its offset's milliseconds) is its delivery latency."""

    def __init__(self, metrics: Metrics, realtime: Realtime) -> None:
        self.metrics = metrics
        self.realtime = realtime

    def on_message(self, payload: bytes) -> None:
        message = decode_message(payload)
        if message.room not in self.realtime.fanout.rooms:
            return
        published_ms = offset_position(message.offset)[0]
        latency = max(0.0, time.time() - published_ms / 1000)
        is_stream = message.room.endswith(f":{TENANT_STREAM}")
        transport = Transport.SSE if is_stream else Transport.SOCKETIO
        self.metrics.realtime_delivery.labels(transport).observe(latency)

    def on_connected(self) -> None:
        """Nothing to measure."""

    def on_disconnected(self) -> None:
        """Nothing to measure."""


class _RuntimeCollector(Collector):
    """The library's counters and the store's figures, read at scrape time."""

    def __init__(
        self,
        metrics: Metrics,
        runtime: Runtime,
        realtime: Realtime | None,
        analytics: DashboardAnalytics | None,
    ) -> None:
        self.metrics = metrics
        self.runtime = runtime
        self.realtime = realtime
        self.analytics = analytics

    def collect(self) -> Iterator[Metric]:
        yield from self._cache()
        yield from self._pipeline()
        if self.realtime is not None:
            yield from self._realtime(self.realtime)
        if self.analytics is not None:
            yield CounterMetricFamily(
                DASHBOARD_REFRESHES.family, DASHBOARD_REFRESHES.help, self.analytics.stats.pushed
            )

    def _cache(self) -> Iterator[Metric]:
        cache = self.runtime.cache
        operations = CounterMetricFamily(
            "freshcache_cache_operations",
            "Cache facade counters (hits, misses, loads, fills stored or dropped, ...).",
            labels=["operation"],
        )
        for name, value in cache.stats.as_dict().items():
            operations.add_metric([name], value)
        yield operations
        warming = getattr(cache, "warming", None)
        if warming is not None:
            warmed = CounterMetricFamily(
                "freshcache_warming",
                "Cache warming after namespace bumps: runs, keys rebuilt, loads, failures.",
                labels=["operation"],
            )
            for name, value in warming.as_dict().items():
                warmed.add_metric([name], value)
            yield warmed
        store = cache.store
        figures = self.metrics.store_figures
        if isinstance(store, MemoryStore):
            yield CounterMetricFamily(CACHE_EVICTIONS.family, CACHE_EVICTIONS.help, store.evictions)
            yield GaugeMetricFamily(
                "freshcache_cache_entries", "Entries in the memory store.", len(store)
            )
        elif figures.evictions is not None:
            yield CounterMetricFamily(
                CACHE_EVICTIONS.family, CACHE_EVICTIONS.help, figures.evictions
            )
        if figures.memory_bytes is not None:
            yield GaugeMetricFamily(
                CACHE_MEMORY_BYTES.family, CACHE_MEMORY_BYTES.help, figures.memory_bytes
            )

    def _pipeline(self) -> Iterator[Metric]:
        runtime = self.runtime
        worker = CounterMetricFamily(
            "freshcache_worker_operations",
            "Invalidation worker counters (events, batches, duplicates, dead letters, ...).",
            labels=["operation"],
        )
        for name, value in runtime.worker.stats.as_dict().items():
            worker.add_metric([name], value)
        yield worker
        yield CounterMetricFamily(
            INVALIDATIONS_COALESCED.family,
            INVALIDATIONS_COALESCED.help,
            runtime.worker.stats.coalesced,
        )
        yield CounterMetricFamily(
            "freshcache_outbox_relayed", "Outbox rows published to the bus.", runtime.relay.relayed
        )
        yield CounterMetricFamily(
            "freshcache_outbox_relay_failures",
            "Outbox relay passes that failed and were retried.",
            runtime.relay.failures,
        )
        applied = CounterMetricFamily(
            "freshcache_write_invalidations",
            "Invalidations applied by write routes before responding (read-your-writes).",
            labels=["result"],
        )
        applied.add_metric(["applied"], runtime.sync.applied)
        applied.add_metric(["failed"], runtime.sync.failed)
        yield applied

    def _realtime(self, realtime: Realtime) -> Iterator[Metric]:
        stats = realtime.stats
        counts = self.metrics.realtime_counts
        socketio: dict[DisconnectReason, int] = {}
        for reason, count in stats.disconnects.items():
            mapped = socketio_reason(reason)
            socketio[mapped] = socketio.get(mapped, 0) + count
        slow = socketio.get(DisconnectReason.SLOW_CONSUMER, 0) - counts.sse_evicted
        socketio[DisconnectReason.SLOW_CONSUMER] = max(0, slow)

        # Plain strings as label values: the samples are also JSON keys (the overview).
        connections = GaugeMetricFamily(
            REALTIME_CONNECTIONS.family, REALTIME_CONNECTIONS.help, labels=["transport"]
        )
        connections.add_metric([Transport.SOCKETIO.value], stats.connections)
        connections.add_metric([Transport.SSE.value], stats.sse_streams)
        yield connections
        connects = CounterMetricFamily(
            REALTIME_CONNECTS.family, REALTIME_CONNECTS.help, labels=["transport"]
        )
        connects.add_metric([Transport.SOCKETIO.value], stats.connections + sum(socketio.values()))
        connects.add_metric([Transport.SSE.value], counts.sse_connects)
        yield connects
        disconnects = CounterMetricFamily(
            REALTIME_DISCONNECTS.family, REALTIME_DISCONNECTS.help, labels=["transport", "reason"]
        )
        for reason in DisconnectReason:
            disconnects.add_metric(
                [Transport.SOCKETIO.value, reason.value], socketio.get(reason, 0)
            )
            disconnects.add_metric(
                [Transport.SSE.value, reason.value], counts.sse_disconnects.get(reason, 0)
            )
        yield disconnects
        messages = CounterMetricFamily(
            REALTIME_MESSAGES.family, REALTIME_MESSAGES.help, labels=["transport", "result"]
        )
        messages.add_metric(
            [Transport.SSE.value, DeliveryResult.DELIVERED.value], counts.sse_frames
        )
        for result, by_transport in (
            (DeliveryResult.DELIVERED, stats.delivered_by_transport),
            (DeliveryResult.DROPPED, stats.dropped_by_transport),
        ):
            messages.add_metric(
                [Transport.SOCKETIO.value, result.value],
                by_transport.get(Transport.SOCKETIO.value, 0),
            )
        # Each eviction drops at least the message that did not fit.
        messages.add_metric([Transport.SSE.value, DeliveryResult.DROPPED.value], counts.sse_evicted)
        yield messages


class MetricsMiddleware:
    """Raw ASGI middleware timing each HTTP request into ``request_duration``, following
    SSE streams (:class:`RealtimeCounts`), and reading the store's figures before a scrape
    of ``/metrics``."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == METRICS_PATH:
            await self.metrics.refresh_store_figures()
        started = time.perf_counter()
        stream = _StreamWatch(self.metrics.realtime_counts)
        try:
            await self.app(scope, stream.receive_from(receive), stream.send_to(send))
        except BaseException:
            stream.failed = True
            raise
        finally:
            stream.close()
            cache = scope.get("state", {}).get(CACHE_RESULT_STATE, "none")
            if cache == CacheResult.STALE:
                cache = CacheResult.HIT  # latency: served from the cache all the same
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.metrics.request_duration.labels(endpoint_of(scope), method, cache).observe(
                time.perf_counter() - started
            )


class _StreamWatch:
    """Follows one response: if it is an event stream, counts it opened, its event
    frames, and how it ended."""

    __slots__ = ("client_left", "counts", "evicted", "failed", "streaming")

    def __init__(self, counts: RealtimeCounts) -> None:
        self.counts = counts
        self.streaming = False
        self.client_left = False
        self.evicted = False
        self.failed = False

    def receive_from(self, receive: Receive) -> Receive:
        async def watched() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.client_left = True
            return message

        return watched

    def send_to(self, send: Send) -> Send:
        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._started(message)
            elif self.streaming and message["type"] == "http.response.body":
                body: bytes = message.get("body", b"")
                # Heartbeats are comment lines (": ..."); every event has an event line
                # (a data line is one line of JSON: it cannot start another).
                for line in body.split(b"\n"):
                    if line.startswith(b"event: "):
                        self.counts.sse_frames += 1
                        self.evicted = self.evicted or line[7:] == _EVICTED
            await send(message)

        return watched

    def _started(self, message: Message) -> None:
        if message["status"] != 200:
            return
        for name, value in message.get("headers", ()):
            if name.lower() == b"content-type" and value.startswith(b"text/event-stream"):
                self.streaming = True
                self.counts.sse_connects += 1
                return

    def close(self) -> None:
        if not self.streaming:
            return
        counts = self.counts
        if self.evicted:
            counts.sse_evicted += 1
            counts.sse_frames -= 1  # the eviction notice is not a message
            counts.sse_closed(DisconnectReason.SLOW_CONSUMER)
        elif self.client_left:
            counts.sse_closed(DisconnectReason.CLIENT)
        elif self.failed:
            counts.sse_closed(DisconnectReason.ERROR)
        else:
            counts.sse_closed(DisconnectReason.SERVER)
