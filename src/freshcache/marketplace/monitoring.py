"""Operator monitoring: the alert rules evaluated in-process, and the operator's overview.

Every ``monitor_interval`` seconds a background task reads this instance's metrics once
and

- feeds them to the :class:`~freshcache.observability.AlertEvaluator` (the rules of
  ``deploy/prometheus/alerts.yml``, with their windows and ``for:`` durations), which is
  what the embedded default has instead of Prometheus;
- records a point of the operator's charts over that interval: the hit ratio of each
  endpoint, invalidations per minute, the mean latency of cached and uncached reads, the
  open real-time connections;
- when the set of firing alerts changed, publishes it as an ``alerts`` event.

Alerts are operator-level: they tell how the deployment's caches and connections fare,
which no tenant can act on (and they summarise every tenant's traffic). So they go to
an operator stream, never to tenants' streams: ``GET /api/monitoring/live-stream`` (the
admin token in ``Authorization: Bearer`` or, for ``EventSource``, ``?access_token=``) is
an SSE stream of the real-time layer, on its fan-out (so operators connected to any
instance get every instance's alerts), sending the overview at once and every interval,
and the ``alerts`` events as they happen. ``GET /api/alerts`` lists the firing alerts and
``GET /api/monitoring/overview`` the charts' points (admin token).

Each instance evaluates its own metrics. With several instances, Prometheus's evaluation
of the same rules over all of them is the deployment's verdict; the embedded default has
one instance, whose verdict is the deployment's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from freshcache.marketplace.metrics import Metrics
from freshcache.observability import (
    CACHE_REQUESTS,
    HTTP_REQUEST_DURATION,
    INVALIDATIONS,
    REALTIME_CONNECTIONS,
    Alert,
    AlertEvaluator,
    CacheResult,
    SeriesKey,
    series,
)
from freshcache.realtime import Realtime
from freshcache.realtime.sse import TenantStreams
from freshcache.stores.base import StoreUnavailable

__all__ = ["OPERATOR", "Monitor", "OverviewPoint", "alert_record"]

logger = logging.getLogger(__name__)

OPERATOR = "operator"
"""The stream id of operators (a tenant's id is a UUID: no tenant can have this one)."""

_POINTS = 360
"""Chart points kept: an hour at the default interval."""
_MAX_TOKEN_LENGTH = 256


def alert_record(alert: Alert) -> dict[str, Any]:
    """An alert as JSON: ``value`` is ``null`` when infinite (drops with no connection
    opened in the window)."""
    return {
        "name": alert.name,
        "severity": alert.severity,
        "labels": dict(alert.labels),
        "value": alert.value if math.isfinite(alert.value) else None,
        "since": alert.since,
        "action": alert.action,
    }


@dataclass(frozen=True)
class _Totals:
    """Cumulative figures of one scrape of the registry."""

    reads: dict[str, tuple[float, float]] = field(default_factory=dict)
    """endpoint -> (hits and stale reads, misses)"""
    latency: dict[str, tuple[float, float]] = field(default_factory=dict)
    """cache result (hit, miss) -> (seconds, requests)"""
    invalidations: float = 0.0
    connections: dict[str, float] = field(default_factory=dict)


def _totals(samples: Mapping[SeriesKey, float]) -> _Totals:
    reads: dict[str, tuple[float, float]] = {}
    latency: dict[str, tuple[float, float]] = {}
    invalidations = 0.0
    connections: dict[str, float] = {}
    duration_sum = f"{HTTP_REQUEST_DURATION.name}_sum"
    duration_count = f"{HTTP_REQUEST_DURATION.name}_count"
    for (name, label_pairs), value in samples.items():
        labels = dict(label_pairs)
        if name == CACHE_REQUESTS.name:
            hits, misses = reads.get(labels["endpoint"], (0.0, 0.0))
            if labels["result"] == CacheResult.MISS:
                misses += value
            else:
                hits += value
            reads[labels["endpoint"]] = (hits, misses)
        elif name in (duration_sum, duration_count) and labels["cache"] != "none":
            seconds, requests = latency.get(labels["cache"], (0.0, 0.0))
            if name == duration_sum:
                seconds += value
            else:
                requests += value
            latency[labels["cache"]] = (seconds, requests)
        elif name == INVALIDATIONS.name:
            invalidations += value
        elif name == REALTIME_CONNECTIONS.name:
            connections[labels["transport"]] = value
    return _Totals(reads, latency, invalidations, connections)


@dataclass(frozen=True)
class OverviewPoint:
    """The operator's charts over one interval ending at ``at`` (Unix seconds)."""

    at: float
    hit_ratio: dict[str, float]
    """Per endpoint with reads in the interval: hits (and stale reads) / reads."""
    reads: dict[str, int]
    invalidations_per_minute: float
    latency_ms: dict[str, float]
    """Mean latency of cached (``hit``) and uncached (``miss``) reads in the interval."""
    connections: dict[str, float]

    def record(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "hit_ratio": self.hit_ratio,
            "reads": self.reads,
            "invalidations_per_minute": self.invalidations_per_minute,
            "latency_ms": self.latency_ms,
            "connections": self.connections,
        }


def _point(at: float, previous: _Totals, current: _Totals, seconds: float) -> OverviewPoint:
    hit_ratio: dict[str, float] = {}
    reads: dict[str, int] = {}
    for endpoint, (hits, misses) in current.reads.items():
        was_hits, was_misses = previous.reads.get(endpoint, (0.0, 0.0))
        new_hits, new_misses = hits - was_hits, misses - was_misses
        if new_hits + new_misses > 0:
            reads[endpoint] = round(new_hits + new_misses)
            hit_ratio[endpoint] = new_hits / (new_hits + new_misses)
    latency_ms: dict[str, float] = {}
    for result, (total, count) in current.latency.items():
        was_total, was_count = previous.latency.get(result, (0.0, 0.0))
        if count > was_count:
            latency_ms[result] = (total - was_total) / (count - was_count) * 1000
    invalidated = max(0.0, current.invalidations - previous.invalidations)
    return OverviewPoint(
        at=at,
        hit_ratio=hit_ratio,
        reads=reads,
        invalidations_per_minute=invalidated / seconds * 60 if seconds > 0 else 0.0,
        latency_ms=latency_ms,
        connections=dict(current.connections),
    )


class Monitor:
    """The in-process alert evaluation and the operator's overview and stream of one
    instance (see the module's documentation). :meth:`start` and :meth:`stop` it."""

    def __init__(
        self,
        metrics: Metrics,
        interval: float,
        *,
        admin_token: str,
        realtime: Realtime | None = None,
        evaluator: AlertEvaluator | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self.metrics = metrics
        self.interval = interval
        self.evaluator = evaluator or AlertEvaluator()
        self.realtime = realtime
        self.points: deque[OverviewPoint] = deque(maxlen=_POINTS)
        self.evaluated_at: float | None = None
        self._admin_token = admin_token
        self._last: tuple[float, _Totals] | None = None
        self._published: frozenset[tuple[str, tuple[tuple[str, str], ...]]] = frozenset()
        self._task: asyncio.Task[None] | None = None
        self.streams: TenantStreams | None = None
        if realtime is not None:
            self.streams = TenantStreams(
                realtime.fanout,
                realtime.history,
                realtime.stats,
                authenticate=self._operator,
                metrics=self._overview_of,
                interval=interval,
            )

    @property
    def firing(self) -> tuple[Alert, ...]:
        """The alerts firing at the last evaluation."""
        return self.evaluator.firing

    async def start(self) -> None:
        """Evaluate once now (the baseline of the first chart point), then every
        ``interval`` seconds in the background."""
        await self.tick()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="freshcache-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.streams is not None:
            await self.streams.stop()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.tick()
            except Exception:
                logger.exception("monitoring failed")

    async def tick(self, now: float | None = None) -> tuple[Alert, ...]:
        """Read the metrics once: evaluate the alerts, record a chart point (from the
        second call on), and publish the firing alerts if they changed."""
        now = time.time() if now is None else now
        await self.metrics.refresh_store_figures()
        samples = {
            series(sample.name, **sample.labels): sample.value
            for family in self.metrics.registry.collect()
            for sample in family.samples
        }
        firing = self.evaluator.observe(now, samples)
        self.evaluated_at = now
        totals = _totals(samples)
        if self._last is not None:
            at, previous = self._last
            self.points.append(_point(now, previous, totals, now - at))
        self._last = (now, totals)
        await self._publish(firing)
        return firing

    async def _publish(self, firing: tuple[Alert, ...]) -> None:
        identities = frozenset(
            (alert.name, tuple(sorted(alert.labels.items()))) for alert in firing
        )
        if identities == self._published or self.realtime is None:
            return
        payload = {"firing": [alert_record(alert) for alert in firing], "at": self.evaluated_at}
        try:
            await self.realtime.publish_tenant_event(OPERATOR, "alerts", payload)
        except StoreUnavailable as error:
            logger.warning("could not publish the firing alerts: %s", error)
            return
        self._published = identities

    def overview(self) -> dict[str, Any]:
        """The operator's charts' points, the cumulative reads per endpoint, and the
        firing alerts."""
        totals = self._last[1] if self._last is not None else _Totals()
        endpoints = {
            endpoint: {
                "hits": round(hits),
                "misses": round(misses),
                "hit_ratio": hits / (hits + misses) if hits + misses else None,
            }
            for endpoint, (hits, misses) in sorted(totals.reads.items())
        }
        hits = sum(hits for hits, _ in totals.reads.values())
        reads = sum(hits + misses for hits, misses in totals.reads.values())
        return {
            "interval": self.interval,
            "evaluated_at": self.evaluated_at,
            "points": [point.record() for point in self.points],
            "endpoints": endpoints,
            "hit_ratio": hits / reads if reads else None,
            "invalidations": round(totals.invalidations),
            "firing": [alert_record(alert) for alert in self.firing],
        }

    async def _operator(self, token: str) -> str | None:
        if len(token) > _MAX_TOKEN_LENGTH:
            return None
        if secrets.compare_digest(token.encode(), self._admin_token.encode()):
            return OPERATOR
        return None

    async def _overview_of(self, stream: str) -> dict[str, Any]:
        return self.overview()
