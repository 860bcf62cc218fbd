"""The pipeline benchmark, short: every update committed through the outbox triggers is
deleted from Redis and dropped from another process's near cache; none is lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PIPELINE_SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "pipeline.py"


def test_every_committed_update_reaches_redis_and_the_near_cache() -> None:
    completed = subprocess.run(
        [sys.executable, str(PIPELINE_SCRIPT), "--quick", "--seconds", "1", "--rates", "50,300"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    figures = json.loads(completed.stdout.strip().splitlines()[-1])

    assert figures["updates"] == 350
    assert figures["events_lost"] == 0, figures
    # A latency is measured for each rate, so drops were seen and matched to commits.
    for rate in ("50", "300"):
        assert figures[f"e2e_p99_ms_at_{rate}"] >= figures[f"e2e_p50_ms_at_{rate}"] > 0
    assert figures["near_hit_vs_cashews_client_side"] > 0
