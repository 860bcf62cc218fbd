"""Counter samples over time, and Prometheus's ``increase()`` over a window of them.

The in-process alert evaluator must reach the same verdicts as the Prometheus rules, so
``increase`` is a port of Prometheus 2.x's ``extrapolatedRate`` (counter resets, and the
extrapolation of the first and last samples towards the window's edges), and a window
``[now - range, now]`` includes samples on both edges as Prometheus 2.x does (3.x leaves
the start out; with samples on a regular interval both give the same rate).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping, Sequence

__all__ = ["CounterHistory", "LabelSet", "SeriesKey", "extrapolated_increase", "series"]

LabelSet = tuple[tuple[str, str], ...]
"""Label names and values, sorted by name."""

SeriesKey = tuple[str, LabelSet]
"""A series: its metric name and its label set."""


def series(name: str, **labels: str) -> SeriesKey:
    """The key of the series ``name{labels}``."""
    return name, tuple(sorted(labels.items()))


def extrapolated_increase(
    points: Sequence[tuple[float, float]], range_start: float, range_end: float
) -> float | None:
    """How much a counter increased over ``[range_start, range_end]``, from the
    ``(timestamp, value)`` points inside it, as Prometheus computes ``increase()``.

    ``None`` with fewer than two points (Prometheus drops such a series from the result).
    """
    if len(points) < 2:
        return None
    first_time, first_value = points[0]
    last_time, last_value = points[-1]
    delta = last_value - first_value
    previous = 0.0
    for _, value in points:
        if value < previous:  # a counter reset: the value before it was lost from delta
            delta += previous
        previous = value
    to_start = first_time - range_start
    to_end = range_end - last_time
    sampled = last_time - first_time
    average_step = sampled / (len(points) - 1)
    if delta > 0 and first_value >= 0:
        # A counter is never negative: extrapolate no further back than its zero point.
        to_zero = sampled * (first_value / delta)
        to_start = min(to_start, to_zero)
    threshold = average_step * 1.1
    extrapolated = sampled
    extrapolated += to_start if to_start < threshold else average_step / 2
    extrapolated += to_end if to_end < threshold else average_step / 2
    return delta * (extrapolated / sampled)


class CounterHistory:
    """The samples of some counters over the last ``retention`` seconds."""

    def __init__(self, retention: float) -> None:
        if retention <= 0:
            raise ValueError("retention must be > 0")
        self.retention = retention
        self._points: dict[SeriesKey, deque[tuple[float, float]]] = {}
        self._latest = float("-inf")

    def record(self, timestamp: float, samples: Mapping[SeriesKey, float]) -> None:
        """Add one scrape: each series' value at ``timestamp`` (not before the last one)."""
        if timestamp < self._latest:
            raise ValueError(f"timestamp {timestamp} is before the last one ({self._latest})")
        self._latest = timestamp
        for key, value in samples.items():
            self._points.setdefault(key, deque()).append((timestamp, float(value)))
        horizon = timestamp - self.retention
        for key in list(self._points):
            points = self._points[key]
            while points and points[0][0] < horizon:
                points.popleft()
            if not points:
                del self._points[key]

    def increases(
        self, name: str, now: float, window: float
    ) -> Iterator[tuple[Mapping[str, str], float]]:
        """Each series of ``name`` with its increase over ``[now - window, now]``, in the
        order of their label sets; series with fewer than two samples there are left out."""
        start = now - window
        for (series_name, labels), points in sorted(self._points.items()):
            if series_name != name:
                continue
            inside = [point for point in points if start <= point[0] <= now]
            increase = extrapolated_increase(inside, start, now)
            if increase is not None:
                yield dict(labels), increase
