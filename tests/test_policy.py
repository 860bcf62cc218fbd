"""TTL tiers and the Cache-Control headers of the specification."""

from __future__ import annotations

import pytest

from freshcache.core.policy import TIERS, TierError, tier


def test_seed_headers_exactly() -> None:
    assert tier("short").cache_control() == "max-age=300, stale-while-revalidate=60"
    assert tier("medium").cache_control() == "max-age=1800, stale-while-revalidate=300"
    assert tier("long").cache_control("public").startswith("public, max-age=3600")
    assert tier("medium").cache_control("private") == (
        "private, max-age=1800, stale-while-revalidate=300"
    )


def test_tier_ranges_are_enforced() -> None:
    assert tier("short").with_ttl(30).ttl == 30
    with pytest.raises(TierError, match="outside the short tier"):
        tier("short").with_ttl(600)
    with pytest.raises(TierError, match="outside the medium tier"):
        tier("medium").with_ttl(60)
    assert tier("long").with_ttl(7 * 86400).ttl == 7 * 86400
    with pytest.raises(TierError, match="unknown tier"):
        tier("forever")
    with pytest.raises(TierError, match="jitter"):
        tier("short").with_ttl(jitter=0.9)


def test_jitter_shortens_within_bounds() -> None:
    jittered = TIERS["medium"].with_ttl(jitter=0.1)
    assert jittered.jittered_ttl(0.0) == 1800
    assert jittered.jittered_ttl(0.999) == pytest.approx(1800 * (1 - 0.0999))
    ttls = {jittered.jittered_ttl(u / 10) for u in range(10)}
    assert len(ttls) == 10 and min(ttls) >= 1620
    assert TIERS["medium"].jittered_ttl(0.7) == 1800


def test_no_stale_window_renders_max_age_only() -> None:
    assert tier("short").with_ttl(60, stale_while_revalidate=0).cache_control() == "max-age=60"
