"""The race benchmark, short: freshcache never returns a stale read under concurrent reads,
writes and invalidations of every kind, while plain cache-aside on the same workload does
(which shows the harness can see stale reads at all)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RACE_SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "race.py"


def run_race(*arguments: str) -> dict[str, object]:
    """Run bench/race.py with ``arguments`` and return its figures (its last line)."""
    completed = subprocess.run(
        [sys.executable, str(RACE_SCRIPT), *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    figures: dict[str, object] = json.loads(completed.stdout.strip().splitlines()[-1])
    return figures


def test_freshcache_reads_no_stale_value_where_plain_cache_aside_does() -> None:
    figures = run_race("--operations", "8000", "--seed", "11")

    assert figures["operations"] == 8000
    assert figures["stale_reads_freshcache"] == 0, figures
    assert figures["stale_by_kind_freshcache"] == {"key": 0, "tag": 0, "namespace": 0}
    plain_by_kind = figures["stale_by_kind_plain"]
    assert isinstance(plain_by_kind, dict)
    # Every kind of invalidation must show the race, or that kind is not really tested.
    assert all(count > 0 for count in plain_by_kind.values()), figures
