"""The specification's alert thresholds, evaluated in-process.

Where no Prometheus runs (the embedded default), :class:`AlertEvaluator` reaches the same
verdicts as ``deploy/prometheus/alerts.yml``: the same windows, rates (Prometheus's
extrapolation included, see :mod:`freshcache.observability.series`), guards and ``for:``
durations. Feed it counter samples at a regular interval (``observe``, or
``observe_registry`` to read a prometheus-client registry); it returns the firing alerts.

The rules, as in the rules file (the specification's names in parentheses):

- ``CacheHitRatioLow`` (``cache_hit_ratio_low``, warning): per endpoint group (products,
  users, categories; the group is taken from the ``endpoint`` label by
  :data:`ENDPOINT_GROUP_PATTERN`), ``1 - misses / requests`` over 5 minutes below 70%
  for 10 minutes. Stale reads count as served by the cache: no reader waited for the
  database. Guard: at least 0.2 requests/s in the group (60 per window), so a handful of
  requests cannot page anyone.
- ``CacheInvalidationStorm`` (``cache_invalidation_storm``, critical): all invalidations
  (every source and kind) above 1000 per minute, as a rate over 2 minutes, for 2 minutes.
- ``RealtimeConnectionDrops`` (``realtime_connection_drops``, critical): per transport,
  disconnects for any reason but ``client`` divided by connections opened, both over 5
  minutes, above 10% for 3 minutes. Guard: at least 5 such drops in the window. Drops
  with no connection opened in the window give +Inf: it fires (nobody reconnects).
"""

from __future__ import annotations

import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from prometheus_client import CollectorRegistry

from freshcache.observability.names import (
    CACHE_REQUESTS,
    INVALIDATIONS,
    REALTIME_CONNECTS,
    REALTIME_DISCONNECTS,
    CacheResult,
    DisconnectReason,
)
from freshcache.observability.series import CounterHistory, LabelSet, SeriesKey, series

__all__ = [
    "DEFAULT_RULES",
    "ENDPOINT_GROUP_PATTERN",
    "Alert",
    "AlertEvaluator",
    "AlertRule",
    "CacheHitRatioLow",
    "CacheInvalidationStorm",
    "RealtimeConnectionDrops",
]

ENDPOINT_GROUP_PATTERN = "/api/(?:marketplace/)?(products|users|categories)(?:/.*)?"
"""Matches a whole route template; its group names the endpoint group (Prometheus and
Python read this regular expression alike)."""


def _divide(numerator: float, denominator: float) -> float:
    """Division as PromQL does it: x/0 is +Inf, -Inf or NaN, never an error."""
    if denominator == 0:
        return math.copysign(math.inf, numerator) if numerator else math.nan
    return numerator / denominator


@dataclass(frozen=True, slots=True)
class Alert:
    """A firing alert: ``since`` is when its condition began to hold (Unix seconds), and
    ``value`` the figure compared with the threshold at the last evaluation."""

    name: str
    severity: str
    labels: Mapping[str, str]
    value: float
    since: float
    action: str | None = None


class AlertRule(ABC):
    """One alert: a condition over counter windows, held for ``hold`` seconds to fire."""

    name: ClassVar[str]
    severity: ClassVar[str]
    action: ClassVar[str | None] = None
    inputs: ClassVar[frozenset[str]]
    """The series names the condition reads."""

    window: float
    hold: float

    @abstractmethod
    def evaluate(self, history: CounterHistory, now: float) -> dict[LabelSet, float]:
        """The label sets for which the condition holds at ``now``, with their values."""


@dataclass(frozen=True)
class CacheHitRatioLow(AlertRule):
    """Cache hit ratio below ``threshold`` on the products, users or categories endpoints."""

    name: ClassVar[str] = "CacheHitRatioLow"
    severity: ClassVar[str] = "warning"
    inputs: ClassVar[frozenset[str]] = frozenset({CACHE_REQUESTS.name})

    threshold: float = 0.70
    window: float = 300.0
    hold: float = 600.0
    min_requests_per_second: float = 0.2
    endpoint_pattern: str = ENDPOINT_GROUP_PATTERN

    def evaluate(self, history: CounterHistory, now: float) -> dict[LabelSet, float]:
        pattern = re.compile(self.endpoint_pattern)
        requests: dict[str, float] = {}
        misses: dict[str, float] = {}
        for labels, increase in history.increases(CACHE_REQUESTS.name, now, self.window):
            match = pattern.fullmatch(labels.get("endpoint", ""))
            if match is None:
                continue
            group = match.group(1)
            rate = increase / self.window
            requests[group] = requests.get(group, 0.0) + rate
            if labels.get("result") == CacheResult.MISS:
                misses[group] = misses.get(group, 0.0) + rate
        # Groups without a miss series have no ratio at all, as in PromQL: nothing missed.
        holding: dict[LabelSet, float] = {}
        for group, missed in misses.items():
            ratio = 1 - _divide(missed, requests[group])
            if ratio < self.threshold and requests[group] >= self.min_requests_per_second:
                holding[(("endpoint_group", group),)] = ratio
        return holding


@dataclass(frozen=True)
class CacheInvalidationStorm(AlertRule):
    """More than ``threshold_per_minute`` invalidations per minute, all sources together."""

    name: ClassVar[str] = "CacheInvalidationStorm"
    severity: ClassVar[str] = "critical"
    action: ClassVar[str | None] = "investigate_bulk_updates"
    inputs: ClassVar[frozenset[str]] = frozenset({INVALIDATIONS.name})

    threshold_per_minute: float = 1000.0
    window: float = 120.0
    hold: float = 120.0

    def evaluate(self, history: CounterHistory, now: float) -> dict[LabelSet, float]:
        rates = [
            increase / self.window
            for _, increase in history.increases(INVALIDATIONS.name, now, self.window)
        ]
        if not rates:
            return {}
        per_minute = sum(rates) * 60
        return {(): per_minute} if per_minute > self.threshold_per_minute else {}


@dataclass(frozen=True)
class RealtimeConnectionDrops(AlertRule):
    """More than ``threshold`` of real-time connections dropped (not closed by the client)."""

    name: ClassVar[str] = "RealtimeConnectionDrops"
    severity: ClassVar[str] = "critical"
    action: ClassVar[str | None] = "check_websocket_health"
    inputs: ClassVar[frozenset[str]] = frozenset(
        {REALTIME_CONNECTS.name, REALTIME_DISCONNECTS.name}
    )

    threshold: float = 0.10
    window: float = 300.0
    hold: float = 180.0
    min_drops: float = 5.0

    def evaluate(self, history: CounterHistory, now: float) -> dict[LabelSet, float]:
        drops: dict[str, float] = {}
        dropped: dict[str, float] = {}
        for labels, increase in history.increases(REALTIME_DISCONNECTS.name, now, self.window):
            if labels.get("reason") == DisconnectReason.CLIENT:
                continue
            transport = labels.get("transport", "")
            drops[transport] = drops.get(transport, 0.0) + increase / self.window
            dropped[transport] = dropped.get(transport, 0.0) + increase
        connects: dict[str, float] = {}
        for labels, increase in history.increases(REALTIME_CONNECTS.name, now, self.window):
            transport = labels.get("transport", "")
            connects[transport] = connects.get(transport, 0.0) + increase / self.window
        holding: dict[LabelSet, float] = {}
        for transport, rate in drops.items():
            if transport not in connects:
                continue
            share = _divide(rate, connects[transport])
            if share > self.threshold and dropped[transport] >= self.min_drops:
                holding[(("transport", transport),)] = share
        return holding


DEFAULT_RULES: tuple[AlertRule, ...] = (
    CacheHitRatioLow(),
    CacheInvalidationStorm(),
    RealtimeConnectionDrops(),
)
"""The specification's three alerts with its thresholds."""


class AlertEvaluator:
    """Evaluates ``rules`` each time counter samples are observed, like a Prometheus rule
    group evaluated at each scrape: a condition must hold at every evaluation for the
    rule's ``hold`` seconds before its alert fires, and resolves as soon as it stops."""

    def __init__(self, rules: Sequence[AlertRule] = DEFAULT_RULES) -> None:
        if not rules:
            raise ValueError("at least one rule is needed")
        self.rules = tuple(rules)
        self._inputs = frozenset().union(*(rule.inputs for rule in self.rules))
        self._history = CounterHistory(max(rule.window for rule in self.rules))
        self._active: dict[tuple[str, LabelSet], float] = {}
        self._firing: tuple[Alert, ...] = ()

    @property
    def firing(self) -> tuple[Alert, ...]:
        """The alerts firing at the last evaluation."""
        return self._firing

    def observe(self, timestamp: float, samples: Mapping[SeriesKey, float]) -> tuple[Alert, ...]:
        """Record the counters' values at ``timestamp`` (Unix seconds, never decreasing)
        and evaluate; return the firing alerts. ``samples`` maps
        :func:`~freshcache.observability.series.series` keys to values; series the rules
        do not read are ignored."""
        self._history.record(
            timestamp, {key: value for key, value in samples.items() if key[0] in self._inputs}
        )
        active: dict[tuple[str, LabelSet], float] = {}
        firing = []
        for rule in self.rules:
            for labels, value in rule.evaluate(self._history, timestamp).items():
                since = self._active.get((rule.name, labels), timestamp)
                active[(rule.name, labels)] = since
                if timestamp - since >= rule.hold:
                    firing.append(
                        Alert(rule.name, rule.severity, dict(labels), value, since, rule.action)
                    )
        self._active = active
        self._firing = tuple(firing)
        return self._firing

    def observe_registry(
        self, registry: CollectorRegistry, now: float | None = None
    ) -> tuple[Alert, ...]:
        """``observe`` the current values of ``registry``'s metrics, at ``now`` (default:
        the current time)."""
        samples = {
            series(sample.name, **sample.labels): sample.value
            for family in registry.collect()
            for sample in family.samples
            if sample.name in self._inputs
        }
        return self.observe(time.time() if now is None else now, samples)
