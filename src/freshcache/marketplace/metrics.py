"""Prometheus metrics of one service instance (prometheus-client, a registry per app).

- ``freshcache_cache_requests_total{endpoint, result}``: cached reads by route, ``hit``
  or ``miss`` (the loader ran).
- ``freshcache_http_request_duration_seconds{endpoint, method, cache}``: request latency,
  ``cache`` being ``hit``, ``miss`` or ``none`` (a route that does not cache), so cached
  and uncached latencies are two series of one histogram.
- The counters of the cache, the invalidation worker, the outbox relay and the
  invalidations write routes apply themselves, read when scraped.

Labels are bounded: ``endpoint`` is the route's template (``/api/products/{product_id}``),
never a concrete path, and ``unmatched`` for requests no route took.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from freshcache.marketplace.runtime import Runtime

__all__ = ["CACHE_RESULT_STATE", "Metrics", "MetricsMiddleware", "endpoint_of"]

CACHE_RESULT_STATE = "freshcache_cache_result"
"""Where a cached route records ``hit`` or ``miss`` in the request state."""

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


def endpoint_of(scope: Scope) -> str:
    """The template of the route that handled ``scope``, or ``unmatched``."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class Metrics:
    """The instance's metrics, in a registry of its own (several apps may share a
    process, e.g. in tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.cache_requests = Counter(
            "freshcache_cache_requests",
            "Cached reads by endpoint: hit (served from the cache) or miss (loaded).",
            ["endpoint", "result"],
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "freshcache_http_request_duration_seconds",
            "HTTP request latency by endpoint, method and cache result (hit, miss, none).",
            ["endpoint", "method", "cache"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._runtime_collector: _RuntimeCollector | None = None

    def attach(self, runtime: Runtime) -> None:
        """Export ``runtime``'s counters too (until :meth:`detach`)."""
        self.detach()
        self._runtime_collector = _RuntimeCollector(runtime)
        self.registry.register(self._runtime_collector)

    def detach(self) -> None:
        if self._runtime_collector is not None:
            self.registry.unregister(self._runtime_collector)
            self._runtime_collector = None

    def record_cache_result(self, request: Request, hit: bool) -> None:
        result = "hit" if hit else "miss"
        self.cache_requests.labels(endpoint_of(request.scope), result).inc()
        setattr(request.state, CACHE_RESULT_STATE, result)


class _RuntimeCollector(Collector):
    """The library's own counters, read at scrape time."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        runtime = self.runtime
        cache = CounterMetricFamily(
            "freshcache_cache_operations",
            "Cache facade counters (hits, misses, loads, fills stored or dropped, ...).",
            labels=["operation"],
        )
        for name, value in runtime.cache.stats.as_dict().items():
            cache.add_metric([name], value)
        yield cache
        worker = CounterMetricFamily(
            "freshcache_worker_operations",
            "Invalidation worker counters (events, batches, duplicates, dead letters, ...).",
            labels=["operation"],
        )
        for name, value in runtime.worker.stats.as_dict().items():
            worker.add_metric([name], value)
        yield worker
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


class MetricsMiddleware:
    """Raw ASGI middleware timing each HTTP request into ``request_duration``."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            cache = scope.get("state", {}).get(CACHE_RESULT_STATE, "none")
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.metrics.request_duration.labels(endpoint_of(scope), method, cache).observe(
                time.perf_counter() - started
            )
