"""Space-Saving top-K: its guarantees hold for any stream."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from freshcache.core.popularity import Counted, SpaceSaving

streams = st.lists(st.integers(min_value=0, max_value=40), max_size=400)
capacities = st.integers(min_value=1, max_value=25)


def record(stream: list[int], capacity: int) -> SpaceSaving[int]:
    sketch: SpaceSaving[int] = SpaceSaving(capacity)
    for item in stream:
        sketch.offer(item)
    return sketch


@given(streams, capacities)
def test_items_seen_more_than_n_over_k_times_are_always_kept(
    stream: list[int], capacity: int
) -> None:
    sketch = record(stream, capacity)
    for item, frequency in Counter(stream).items():
        if frequency > len(stream) / capacity:
            assert item in sketch, (item, frequency)


@given(st.data(), st.integers(min_value=2, max_value=25), st.integers(min_value=0, max_value=300))
def test_a_heavy_hitter_hidden_in_noise_is_kept(
    data: st.DataObject, capacity: int, noise_length: int
) -> None:
    noise = data.draw(st.lists(st.integers(0, 1000), min_size=noise_length, max_size=noise_length))
    # Just above n / k: m > (noise + m) / k  <=>  m > noise / (k - 1).
    heavy = noise_length // (capacity - 1) + 1
    stream = noise + [-1] * heavy
    random.Random(data.draw(st.integers())).shuffle(stream)
    assert heavy > len(stream) / capacity
    assert -1 in record(stream, capacity)


@given(streams, capacities)
def test_counts_bound_the_true_frequencies(stream: list[int], capacity: int) -> None:
    sketch = record(stream, capacity)
    frequencies = Counter(stream)
    assert len(sketch) <= capacity
    assert sum(counted.count for counted in sketch.top()) == len(stream) == sketch.total
    for counted in sketch.top():
        assert counted.count - counted.error <= frequencies[counted.item] <= counted.count
    if len(sketch) == capacity:
        smallest = min(counted.count for counted in sketch.top())
        for item, frequency in frequencies.items():
            if item not in sketch:
                assert frequency <= smallest


@given(streams, capacities)
def test_top_ranks_by_decreasing_count(stream: list[int], capacity: int) -> None:
    sketch = record(stream, capacity)
    counts = [counted.count for counted in sketch.top()]
    assert counts == sorted(counts, reverse=True)
    assert sketch.top(3) == sketch.top()[:3]
    for counted in sketch.top():
        assert sketch.count(counted.item) == counted.count
        assert sketch.error(counted.item) == counted.error


def test_offer_reports_the_item_it_replaced() -> None:
    sketch: SpaceSaving[str] = SpaceSaving(2)
    assert sketch.offer("a") is None
    assert sketch.offer("a") is None
    assert sketch.offer("b") is None
    # "b" has the smallest count: "c" takes its place and inherits its count.
    assert sketch.offer("c") == "b"
    assert sketch.top() == [Counted("a", 2, 0), Counted("c", 2, 1)]
    assert sketch.count("b") == 0 and "b" not in sketch


def test_decay_halves_counts_and_forgets_what_reaches_zero() -> None:
    sketch: SpaceSaving[str] = SpaceSaving(3)
    for item in ["a"] * 8 + ["b"] * 3 + ["c"]:
        sketch.offer(item)
    assert sketch.decay() == ["c"]
    assert sketch.top() == [Counted("a", 4, 0), Counted("b", 1, 0)]
    assert sketch.total == 6
    # Room again: a newcomer does not replace anyone.
    assert sketch.offer("d") is None and len(sketch) == 3
    # What is read now overtakes what was read long ago.
    for _ in range(3):
        sketch.decay()
    for _ in range(3):
        sketch.offer("d")
    assert sketch.top(1)[0].item == "d"


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        SpaceSaving[int](0)
