"""What the bench scripts share: the raw Redis client, the text table, the figures line,
throughput loops, helper processes that answer JSON lines, and a raw HTTP load client.

Every script ends by printing one JSON line with its figures, so tests and CI can parse
the last line of its output whatever the table above it looks like.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis

from freshcache import RedisStore

__all__ = [
    "Blast",
    "HelperProcess",
    "emit_figures",
    "http_blast",
    "http_get",
    "median_ratio",
    "ops_per_second",
    "percentile",
    "print_table",
    "raw_client",
    "read_commands",
    "reply",
    "rotating_rounds",
]

# Helpers exchange whole key lists on one line: far beyond asyncio's 64 KiB default.
_LINE_LIMIT = 2**28


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


async def ops_per_second(get: Callable[[], Awaitable[object]], iterations: int) -> float:
    """Sequential calls of ``get`` per second."""
    started = time.perf_counter()
    for _ in range(iterations):
        await get()
    return iterations / (time.perf_counter() - started)


async def rotating_rounds(
    contenders: Mapping[str, Callable[[], Awaitable[object]]], rounds: int, iterations: int
) -> dict[str, list[float]]:
    """Ops/s of each contender, one figure per round; each round starts with the next
    contender, so that none always runs first (or last) after the others."""
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for round_number in range(rounds):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            rates[name].append(await ops_per_second(contenders[name], iterations))
    return rates


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """The median of round-by-round ratios (rounds ran at the same machine load)."""
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile of ``values`` (``share`` from 0 to 1); NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


# -- helper processes -------------------------------------------------------------------


class HelperProcess:
    """A Python process of the bench's own (``python <script> <arguments>``) that prints
    ``{"ready": true}`` once set up, then answers each JSON command line on its stdin with
    one JSON line on its stdout (see :func:`read_commands` and :func:`reply`). Its stderr
    is the bench's."""

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process

    @classmethod
    async def start(cls, name: str, *arguments: str, ready_within: float = 60.0) -> HelperProcess:
        """Start the helper and wait until it says it is ready."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *arguments,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=_LINE_LIMIT,
        )
        helper = cls(name, process)
        try:
            if not (await helper._receive(ready_within)).get("ready"):
                raise RuntimeError(f"{name} did not say it was ready")
        except BaseException:
            await helper.kill()
            raise
        return helper

    async def ask(self, command: dict[str, Any], within: float = 60.0) -> dict[str, Any]:
        """Send ``command``; return the helper's answer (waiting up to ``within`` s)."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()
        return await self._receive(within)

    async def finish(self, within: float = 60.0) -> dict[str, Any]:
        """Send ``{"finish": true}``; return the helper's last answer once it has exited."""
        answer = await self.ask({"finish": True}, within)
        async with asyncio.timeout(within):
            await self.process.wait()
        return answer

    async def kill(self) -> None:
        """End the helper at once if it is still running."""
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def _receive(self, within: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        async with asyncio.timeout(within):
            line = await self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.name} exited with {await self.process.wait()}")
        answer: dict[str, Any] = json.loads(line)
        return answer


async def read_commands() -> AsyncIterator[dict[str, Any]]:
    """In a helper process: the JSON commands arriving on stdin, until it closes."""
    reader = asyncio.StreamReader(limit=_LINE_LIMIT)
    await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    while line := await reader.readline():
        command: dict[str, Any] = json.loads(line)
        yield command


def reply(answer: dict[str, Any]) -> None:
    """In a helper process: send one answer to the bench (one JSON line on stdout)."""
    print(json.dumps(answer), flush=True)


# -- a raw HTTP load client -------------------------------------------------------------


def http_get(path: str, headers: Mapping[str, str] | None = None) -> bytes:
    """A keep-alive HTTP/1.1 GET request to 127.0.0.1, as bytes on the wire."""
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass(frozen=True)
class Blast:
    """What :func:`http_blast` got: responses by status and by ``X-Cache`` value (``""``
    when absent), and the share of one core the client itself used."""

    responses: int
    seconds: float
    statuses: Counter[int]
    cache_results: Counter[str]
    client_cpu: float

    @property
    def rate(self) -> float:
        """Responses per second."""
        return self.responses / self.seconds


def _response_head(head: bytes) -> tuple[int, int, str]:
    """Status, Content-Length and X-Cache of a response head."""
    status_line, *lines = head.split(b"\r\n")
    length, cache = -1, ""
    for line in lines:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"x-cache":
            cache = value.strip().decode()
    if length < 0:
        raise RuntimeError("a response without Content-Length: this client cannot read it")
    return int(status_line.split(b" ", 2)[1]), length, cache


async def http_blast(
    port: int, requests: Sequence[bytes], connections: int, seconds: float | None = None
) -> Blast:
    """Send ``requests`` in turn on each of ``connections`` keep-alive connections to
    127.0.0.1:``port`` (one in flight per connection, each starting at its own offset) for
    ``seconds``; without ``seconds``, each request once (the connections share them). A
    client of a few lines, far cheaper per request than httpx, so that the server is what
    is measured; its CPU share says whether it kept up."""
    statuses: Counter[int] = Counter()
    cache_results: Counter[str] = Counter()
    deadline = math.inf if seconds is None else time.monotonic() + seconds

    async def connection(share: Iterable[bytes]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=_LINE_LIMIT)
        try:
            for request in share:
                if time.monotonic() >= deadline:
                    break
                writer.write(request)
                status, length, cache = _response_head(await reader.readuntil(b"\r\n\r\n"))
                await reader.readexactly(length)
                statuses[status] += 1
                cache_results[cache] += 1
        finally:
            writer.close()
            await writer.wait_closed()

    shares: list[Iterable[bytes]]
    if seconds is None:
        shares = [requests[number::connections] for number in range(connections)]
    else:
        shares = [
            itertools.islice(itertools.cycle(requests), number * len(requests) // connections, None)
            for number in range(connections)
        ]
    cpu, started = time.process_time(), time.monotonic()
    await asyncio.gather(*(connection(share) for share in shares))
    elapsed = time.monotonic() - started
    return Blast(
        sum(statuses.values()),
        elapsed,
        statuses,
        cache_results,
        (time.process_time() - cpu) / elapsed,
    )
