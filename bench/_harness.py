"""What the bench scripts share: the raw Redis client, the text table and the figures line.

Every script ends by printing one JSON line with its figures, so tests and CI can parse
the last line of its output whatever the table above it looks like.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import redis.asyncio as redis

from freshcache import RedisStore

__all__ = ["emit_figures", "print_table", "raw_client"]


def raw_client(url: str) -> redis.Redis:
    """A redis-py client with exactly the settings ``RedisStore.from_url`` uses, so a
    baseline and freshcache differ only in the commands they send."""
    client = RedisStore.from_url(url).client
    if not isinstance(client, redis.Redis):
        raise TypeError("expected a single-node redis client")
    return client


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print ``rows`` under ``headers``: the first column left-aligned, the others right."""
    cells = [[str(header) for header in headers]]
    cells += [[_format_cell(value) for value in row] for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        first, *rest = (
            cell.ljust(width) if column == 0 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        return "  ".join([first, *rest])

    print(f"\n{title}")
    print(line(cells[0]))
    print("  ".join("-" * width for width in widths))
    for row in cells[1:]:
        print(line(row))


def _format_cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def emit_figures(figures: dict[str, object]) -> None:
    """Print the figures as the script's last line (one JSON object)."""
    print(json.dumps(figures, sort_keys=False), flush=True)
