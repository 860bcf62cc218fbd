"""The metric contract: names, label names and label values of what freshcache exports.

The service registers its metrics from these specifications, the Prometheus alert rules
(``deploy/prometheus/alerts.yml``) and the Grafana dashboard
(``deploy/grafana/freshcache-dashboard.json``) query these names, and the in-process
:class:`~freshcache.observability.alerts.AlertEvaluator` reads them: one source for all
four, checked by the tests.

``MetricSpec.name`` is the name as Prometheus stores and queries it: counters end in
``_total``; a histogram's series are ``<name>_bucket``, ``<name>_sum`` and ``<name>_count``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = [
    "CACHE_EVICTIONS",
    "CACHE_MEMORY_BYTES",
    "CACHE_REQUESTS",
    "CONTRACT",
    "DASHBOARD_REFRESHES",
    "HTTP_REQUEST_DURATION",
    "INVALIDATIONS",
    "INVALIDATIONS_COALESCED",
    "REALTIME_CONNECTIONS",
    "REALTIME_CONNECTS",
    "REALTIME_DELIVERY",
    "REALTIME_DISCONNECTS",
    "REALTIME_MESSAGES",
    "CacheResult",
    "DeliveryResult",
    "DisconnectReason",
    "InvalidationKind",
    "InvalidationSource",
    "MetricKind",
    "MetricSpec",
    "RequestCacheResult",
    "Transport",
]


class MetricKind(StrEnum):
    """The Prometheus metric types the contract uses."""

    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


class CacheResult(StrEnum):
    """``result`` of ``freshcache_cache_requests_total``: how a cached read was served."""

    HIT = "hit"
    """Fresh value from the cache."""
    MISS = "miss"
    """The loader ran (or the read waited for another reader's load)."""
    STALE = "stale"
    """A stale value within its stale-while-revalidate window, refreshed in the background."""


class RequestCacheResult(StrEnum):
    """``cache`` of ``freshcache_http_request_duration_seconds``."""

    HIT = "hit"
    MISS = "miss"
    NONE = "none"
    """The route does not cache."""


class InvalidationSource(StrEnum):
    """``source`` of ``freshcache_invalidations_total``: where the invalidation came from."""

    API = "api"
    """A write route or the invalidation API of the service."""
    OUTBOX = "outbox"
    """A database change relayed from the transactional outbox."""
    EVENT = "event"
    """An application event (the specification's JSON form) on the bus."""


class InvalidationKind(StrEnum):
    """``kind`` of ``freshcache_invalidations_total``: one per key, tag or namespace."""

    KEY = "key"
    TAG = "tag"
    NAMESPACE = "namespace"


class Transport(StrEnum):
    """``transport`` of the real-time metrics."""

    SOCKETIO = "socketio"
    SSE = "sse"


class DisconnectReason(StrEnum):
    """``reason`` of ``freshcache_realtime_disconnects_total``.

    Every reason but ``client`` counts as a drop for the ``RealtimeConnectionDrops`` alert.
    """

    CLIENT = "client"
    """The client closed the connection (page left, tab closed)."""
    SERVER = "server"
    """The server closed it (shutdown, authentication expired)."""
    SLOW_CONSUMER = "slow_consumer"
    """The client did not read fast enough and its queue overflowed."""
    ERROR = "error"
    """An error while serving the connection."""
    TRANSPORT_LOST = "transport_lost"
    """The connection broke (ping timeout, reset) without a close from either side."""


class DeliveryResult(StrEnum):
    """``result`` of ``freshcache_realtime_messages_total``."""

    DELIVERED = "delivered"
    DROPPED = "dropped"


# Request latencies: from sub-millisecond cache hits to multi-second uncached reports.
_HTTP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# From a change to the browser: milliseconds in one region, up to seconds when congested.
_DELIVERY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric of the contract.

    ``name`` is the queried name (``_total`` for counters); ``labels`` the label names;
    ``buckets`` a histogram's upper bounds. :meth:`counter`, :meth:`gauge` and
    :meth:`histogram` create the prometheus-client metric in a registry.
    """

    name: str
    kind: MetricKind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def family(self) -> str:
        """The name prometheus-client takes (it appends ``_total`` to counters itself)."""
        if self.kind is MetricKind.COUNTER:
            return self.name.removesuffix("_total")
        return self.name

    @property
    def series_names(self) -> tuple[str, ...]:
        """The series names a query may use for this metric."""
        if self.kind is MetricKind.HISTOGRAM:
            return tuple(f"{self.name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        return (self.name,)

    def counter(self, registry: CollectorRegistry) -> Counter:
        """A prometheus-client Counter for this metric, registered in ``registry``."""
        self._expect(MetricKind.COUNTER)
        return Counter(self.family, self.help, self.labels, registry=registry)

    def gauge(self, registry: CollectorRegistry) -> Gauge:
        """A prometheus-client Gauge for this metric, registered in ``registry``."""
        self._expect(MetricKind.GAUGE)
        return Gauge(self.family, self.help, self.labels, registry=registry)

    def histogram(self, registry: CollectorRegistry) -> Histogram:
        """A prometheus-client Histogram for this metric, registered in ``registry``."""
        self._expect(MetricKind.HISTOGRAM)
        return Histogram(
            self.family, self.help, self.labels, buckets=self.buckets, registry=registry
        )

    def _expect(self, kind: MetricKind) -> None:
        if self.kind is not kind:
            raise TypeError(f"{self.name} is a {self.kind}, not a {kind}")


CACHE_REQUESTS = MetricSpec(
    "freshcache_cache_requests_total",
    MetricKind.COUNTER,
    "Cached reads by endpoint (route template): hit, miss or stale.",
    ("endpoint", "result"),
)
HTTP_REQUEST_DURATION = MetricSpec(
    "freshcache_http_request_duration_seconds",
    MetricKind.HISTOGRAM,
    "HTTP request latency by endpoint, method and cache result (hit, miss, none).",
    ("endpoint", "method", "cache"),
    _HTTP_BUCKETS,
)
CACHE_MEMORY_BYTES = MetricSpec(
    "freshcache_cache_memory_bytes",
    MetricKind.GAUGE,
    "Memory used by the cache store (Redis used_memory, or the memory store's estimate).",
)
CACHE_EVICTIONS = MetricSpec(
    "freshcache_cache_evictions_total",
    MetricKind.COUNTER,
    "Entries the cache store evicted for lack of memory.",
)
INVALIDATIONS = MetricSpec(
    "freshcache_invalidations_total",
    MetricKind.COUNTER,
    "Invalidations applied, once per invalidated key, tag or namespace, by source and kind.",
    ("source", "kind"),
)
INVALIDATIONS_COALESCED = MetricSpec(
    "freshcache_invalidations_coalesced_total",
    MetricKind.COUNTER,
    "Invalidations merged into another one of the same batch instead of being applied.",
)
REALTIME_CONNECTIONS = MetricSpec(
    "freshcache_realtime_connections",
    MetricKind.GAUGE,
    "Open real-time connections by transport.",
    ("transport",),
)
REALTIME_CONNECTS = MetricSpec(
    "freshcache_realtime_connects_total",
    MetricKind.COUNTER,
    "Real-time connections opened, by transport.",
    ("transport",),
)
REALTIME_DISCONNECTS = MetricSpec(
    "freshcache_realtime_disconnects_total",
    MetricKind.COUNTER,
    "Real-time connections closed, by transport and reason.",
    ("transport", "reason"),
)
REALTIME_MESSAGES = MetricSpec(
    "freshcache_realtime_messages_total",
    MetricKind.COUNTER,
    "Real-time messages by transport: delivered to a connection or dropped.",
    ("transport", "result"),
)
REALTIME_DELIVERY = MetricSpec(
    "freshcache_realtime_delivery_seconds",
    MetricKind.HISTOGRAM,
    "Seconds from a change's publication to its delivery on a connection, by transport.",
    ("transport",),
    _DELIVERY_BUCKETS,
)
DASHBOARD_REFRESHES = MetricSpec(
    "freshcache_dashboard_refreshes_total",
    MetricKind.COUNTER,
    "Dashboard updates pushed to subscribers.",
)

CONTRACT: tuple[MetricSpec, ...] = (
    CACHE_REQUESTS,
    HTTP_REQUEST_DURATION,
    CACHE_MEMORY_BYTES,
    CACHE_EVICTIONS,
    INVALIDATIONS,
    INVALIDATIONS_COALESCED,
    REALTIME_CONNECTIONS,
    REALTIME_CONNECTS,
    REALTIME_DISCONNECTS,
    REALTIME_MESSAGES,
    REALTIME_DELIVERY,
    DASHBOARD_REFRESHES,
)
"""Every metric the service exports under the contract."""
