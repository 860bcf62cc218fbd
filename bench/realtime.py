"""Real-time delivery: latency and capacity of freshcache's rooms and SSE streams, beside a
bare python-socketio server doing the same broadcast in the same run.

N clients subscribe to one product room; the server broadcasts stock updates at R per
second. Clients are cheap: one separate process speaking Engine.IO/Socket.IO over a
minimal WebSocket implementation (or plain HTTP for SSE) on raw asyncio protocols, so
that the server, not the clients, is what is measured. Latency is the client's receive
time minus the timestamp in the payload, which is the time the broadcast was *due*
(not when the server got round to it: a server that falls behind pays for it). Servers
run under uvicorn with its defaults (uvloop, websockets' sans-I/O implementation), one
process each; clients and server share the machine's clock.

Figures (last line, JSON):

- ``rt_p99_ms`` / ``rt_p50_ms``: freshcache rooms, N = 1,000, R = 10 (target p99 <= 50);
- ``bare_p99_ms`` / ``bare_p50_ms``: the bare python-socketio server, same load;
- ``rt_capacity_vs_bare_socketio``: the highest delivery rate (deliveries per second)
  at which p99 stays <= 250 ms, freshcache over bare (target >= 1.5), and both rates;
- ``sse_p99_ms``: freshcache SSE streams, N = 1,000, R = 10 (target <= 50);
- ``rt_lost``: deliveries missing in freshcache's measured phases (target 0).

Usage: ``python bench/realtime.py [--quick] [--clients N] [--seconds S]``. The script
starts its own server and client processes (``--serve`` and ``--clients-of`` modes).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from _harness import emit_figures, print_table

ROOM = "product:1"
SCRIPT = str(Path(__file__).resolve())
LATENCY_LIMIT_MS = 250.0

# -- clients (their own process) ---------------------------------------------------------


class Samples:
    """Latencies (ms) measured by every client of the process."""

    def __init__(self) -> None:
        self.latencies: list[float] = []

    def record(self, payload: bytes) -> None:
        start = payload.find(b'"timestamp":')
        if start < 0:
            return
        start += 12
        end = start
        while payload[end] not in b",}":
            end += 1
        self.latencies.append(time.time() * 1000 - float(payload[start:end]))


class SocketIoClient(asyncio.Protocol):
    """Engine.IO v4 over a minimal WebSocket (RFC 6455, text frames, no extensions)."""

    def __init__(self, port: int, subscribe: str, samples: Samples) -> None:
        self.port = port
        self.subscribe = subscribe
        self.samples = samples
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buffer = bytearray()
        self.upgraded = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            if b" 101 " not in self.buffer[:end]:
                self._fail(f"handshake refused: {bytes(self.buffer[:end])!r}")
                return
            del self.buffer[: end + 4]
            self.upgraded = True
        buffer, offset = self.buffer, 0
        while len(buffer) - offset >= 2:
            length, header = buffer[offset + 1] & 0x7F, 2
            if length == 126:
                if len(buffer) - offset < 4:
                    break
                length, header = int.from_bytes(buffer[offset + 2 : offset + 4]), 4
            elif length == 127:
                if len(buffer) - offset < 10:
                    break
                length, header = int.from_bytes(buffer[offset + 2 : offset + 10]), 10
            if len(buffer) - offset < header + length:
                break
            opcode = buffer[offset] & 0x0F
            payload = bytes(buffer[offset + header : offset + header + length])
            offset += header + length
            if opcode == 1:
                self._packet(payload)
            elif opcode == 9:
                self.send(payload, opcode=0xA)  # uvicorn's keepalive ping: pong
            elif opcode == 8:
                self._fail("closed by the server")
        del buffer[:offset]

    def _packet(self, packet: bytes) -> None:
        if packet.startswith(b"42"):
            self.samples.record(packet)
        elif packet == b"2":
            self.send(b"3")  # Engine.IO pong
        elif packet.startswith(b"0{"):
            self.send(b'40{"token":"bench"}')
        elif packet.startswith(b"40"):
            self.send(b"420" + json.dumps([self.subscribe, {"room": ROOM}]).encode())
        elif packet.startswith(b"430") and not self.ready.done():
            self.ready.set_result(None)
        elif packet.startswith(b"44"):
            self._fail(f"refused: {packet!r}")

    def send(self, data: bytes, opcode: int = 1) -> None:
        """A masked frame (text by default) of under 126 bytes."""
        assert self.transport is not None and len(data) < 126
        mask = os.urandom(4)
        masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(data))
        self.transport.write(bytes([0x80 | opcode, 0x80 | len(data)]) + mask + masked)

    def _fail(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail("connection lost")


class SseClient(asyncio.Protocol):
    """A ``GET`` of the SSE stream over plain HTTP/1.1; reads events as they come."""

    def __init__(self, port: int, samples: Samples) -> None:
        self.port = port
        self.samples = samples
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).write(
            f"GET /api/dashboard/live-stream HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            "Authorization: Bearer bench\r\nAccept: text/event-stream\r\n\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        # Each event is one chunk of the chunked body; a TCP read may end mid-event.
        events = (self.buffer + data).split(b"\n\n")
        self.buffer = events.pop()
        for event in events:
            if b"event: metrics" in event and not self.ready.done():
                self.ready.set_result(None)
            else:
                self.samples.record(event)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("connection lost"))


async def run_clients(port: int, count: int, kind: str) -> None:
    """Connect ``count`` clients, then answer ``report`` commands on stdin."""
    loop = asyncio.get_running_loop()
    samples = Samples()
    clients: list[SocketIoClient | SseClient] = []
    for first in range(0, count, 100):
        batch: list[SocketIoClient | SseClient] = []
        for _ in range(first, min(count, first + 100)):
            client: SocketIoClient | SseClient
            if kind == "sse":
                client = SseClient(port, samples)
            else:
                client = SocketIoClient(port, "join" if kind == "bare" else "subscribe", samples)
            await loop.create_connection(lambda c=client: c, "127.0.0.1", port)  # type: ignore[misc]
            batch.append(client)
        await asyncio.wait_for(asyncio.gather(*(c.ready for c in batch)), 60)
        clients += batch
    # The measuring side keeps its own collector quiet: what it pauses, it adds.
    gc.collect()
    gc.freeze()
    gc.disable()
    commands = await _stdin_lines()
    _reply({"ready": len(clients)})
    async for command in commands:
        if command["op"] == "report":
            deadline = time.monotonic() + command["wait"]
            while True:  # until every delivery arrived, or the wait is over
                if len(samples.latencies) >= command["expected"] or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.02)
            latencies, samples.latencies = sorted(samples.latencies), []
            _reply(_summary(latencies))
        elif command["op"] == "exit":
            return


def _summary(latencies: list[float]) -> dict[str, float]:
    def quantile(q: float) -> float:
        return latencies[int(q * (len(latencies) - 1))] if latencies else float("nan")

    return {
        "received": len(latencies),
        "p50": quantile(0.5),
        "p99": quantile(0.99),
        "max": latencies[-1] if latencies else float("nan"),
    }


# -- servers (their own process) -----------------------------------------------------------


class GcWatch:
    """Time spent in the cyclic collector, and its longest pause."""

    def __init__(self) -> None:
        self.total = 0.0
        self.longest = 0.0
        self.full = 0
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        pause = time.perf_counter() - self._start
        self.total += pause
        self.longest = max(self.longest, pause)
        self.full += info["generation"] == 2

    def reset(self) -> None:
        self.total = self.longest = 0.0
        self.full = 0


Broadcaster = Callable[[int, float], Awaitable[None]]
Disconnects = Callable[[], dict[str, int]]


def bare_app() -> tuple[Any, Broadcaster, Disconnects]:
    import socketio  # type: ignore[import-untyped]

    server = socketio.AsyncServer(async_mode="asgi", logger=False, engineio_logger=False)

    async def join(sid: str, data: dict[str, str]) -> dict[str, bool]:
        await server.enter_room(sid, data["room"])
        return {"ok": True}

    server.on("join", join)

    async def broadcast(sequence: int, due: float) -> None:
        payload = {"productId": 1, "newStock": sequence, "timestamp": due}
        await server.emit("stockUpdate", payload, room=ROOM)

    disconnects: dict[str, int] = {}

    async def disconnect(sid: str, reason: str) -> None:
        disconnects[reason] = disconnects.get(reason, 0) + 1

    server.on("disconnect", disconnect)
    return socketio.ASGIApp(server), broadcast, lambda: disconnects


def freshcache_app(kind: str) -> tuple[Any, Broadcaster, Disconnects]:
    from starlette.applications import Starlette

    from freshcache.realtime import Realtime

    async def authenticate(token: str) -> str | None:
        return "bench" if token == "bench" else None

    async def authorize(tenant: str, room: str) -> bool:
        return True

    async def snapshot(tenant: str, room: str) -> dict[str, Any]:
        return {"productId": 1, "newStock": 0, "timestamp": 0}

    async def metrics(tenant: str) -> dict[str, Any]:
        return {}

    # A deep queue: under overload the capacity search must see latency, not evictions.
    realtime = Realtime(
        authenticate=authenticate,
        authorize=authorize,
        snapshot=snapshot,
        metrics=metrics,
        metrics_interval=3600,
        send_queue_limit=4096,
        freeze_collector=True,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with realtime:
            yield

    app = Starlette(lifespan=lifespan)
    realtime.mount(app)

    async def broadcast(sequence: int, due: float) -> None:
        if kind == "sse":
            payload = {"productId": 1, "newStock": sequence, "timestamp": due}
            await realtime.publish_tenant_event("bench", "stockAlert", payload)
        else:
            await realtime.publish_stock_update("bench", 1, sequence, timestamp=due)

    return app, broadcast, lambda: realtime.stats.disconnects


async def run_server(port: int, kind: str) -> None:
    """Serve, then broadcast on ``broadcast`` commands from stdin."""
    import uvicorn

    app, broadcast, disconnects = bare_app() if kind == "bare" else freshcache_app(kind)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", backlog=4096)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while True:
        if server.started:
            break
        await asyncio.sleep(0.01)
    watch = GcWatch()
    commands = await _stdin_lines()
    _reply({"ready": True})
    sequence = 0
    async for command in commands:
        if command["op"] == "exit":
            break
        watch.reset()
        cpu = time.process_time()
        rate, count = command["rate"], int(command["rate"] * command["seconds"])
        start = time.time()
        sent = 0
        # Broadcasts due after the phase ends are not sent, even if the server is behind.
        while sent < count and time.time() < start + command["seconds"]:
            due = start + sent / rate
            delay = due - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            sequence += 1
            sent += 1
            await broadcast(sequence, due * 1000)
        await asyncio.sleep(0)
        _reply(
            {
                "sent": sent,
                "cpu_seconds": time.process_time() - cpu,
                "gc_seconds": watch.total,
                "gc_longest_ms": watch.longest * 1000,
                "gc_full": watch.full,
                "disconnects": dict(disconnects()),
            }
        )
    server.should_exit = True
    await serving


# -- plumbing --------------------------------------------------------------------------------


def _reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _stdin_lines() -> AsyncIterator[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def lines() -> AsyncIterator[dict[str, Any]]:
        while line := await reader.readline():
            yield json.loads(line)

    return lines()


class Child:
    """A process of this script in another mode, spoken to in JSON lines."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, *arguments: str) -> Child:
        process = await asyncio.create_subprocess_exec(
            sys.executable, SCRIPT, *arguments, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        return cls(process)

    async def ask(self, **command: Any) -> dict[str, Any]:
        """Send ``command``; its answer (within two minutes)."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()
        return await self.answer(120)

    async def answer(self, within: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), within)
        if not line:
            raise RuntimeError(f"a bench process exited (status {await self.process.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def stop(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            assert self.process.stdin is not None
            self.process.stdin.write(b'{"op": "exit"}\n')
            await self.process.stdin.drain()
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


@dataclass
class Step:
    """One measured phase: R broadcasts per second for a few seconds."""

    server: str
    clients: int
    rate: float
    seconds: float
    sent: int
    received: int
    p50: float
    p99: float
    longest: float
    cpu_us_per_delivery: float
    gc_share: float
    gc_longest_ms: float

    @property
    def deliveries_per_second(self) -> float:
        return self.received / self.seconds

    @property
    def lost(self) -> int:
        return self.sent * self.clients - self.received

    @property
    def within_limit(self) -> bool:
        return self.p99 <= LATENCY_LIMIT_MS and self.lost == 0


class Bench:
    """A server process and its client process, measured at several rates."""

    def __init__(self, kind: str, clients: int) -> None:
        self.kind = kind
        self.clients = clients
        self.steps: list[Step] = []

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Bench]:
        from freshcache.testing import free_port

        port = free_port()
        self.server = await Child.start("--serve", self.kind, "--port", str(port))
        await self.server.answer(60)
        self.client_process = await Child.start(
            "--clients-of", self.kind, "--port", str(port), "--clients", str(self.clients)
        )
        try:
            await self.client_process.answer(180)
            yield self
        finally:
            await self.client_process.stop()
            await self.server.stop()

    async def measure(self, rate: float, seconds: float, *, record: bool = True) -> Step:
        await self.client_process.ask(op="report", expected=0, wait=0)  # a clean slate
        server = await self.server.ask(op="broadcast", rate=rate, seconds=seconds)
        expected = server["sent"] * self.clients
        clients = await self.client_process.ask(op="report", expected=expected, wait=5)
        received = max(clients["received"], 1)
        step = Step(
            server=self.kind,
            clients=self.clients,
            rate=rate,
            seconds=seconds,
            sent=server["sent"],
            received=clients["received"],
            p50=clients["p50"],
            p99=clients["p99"],
            longest=clients["max"],
            cpu_us_per_delivery=server["cpu_seconds"] / received * 1e6,
            gc_share=server["gc_seconds"] / max(server["cpu_seconds"], 1e-9),
            gc_longest_ms=server["gc_longest_ms"],
        )
        if record:
            self.steps.append(step)
        return step

    async def capacity(
        self, first_rate: float, factor: float, seconds: float, bisections: int
    ) -> float:
        """The highest delivery rate (per second) with p99 <= 250 ms and nothing lost:
        rates grow by ``factor`` until one fails, then the gap is bisected."""
        passed: Step | None = None
        rate, failed_rate = first_rate, None
        while failed_rate is None and rate <= 400:
            step = await self.measure(rate, seconds)
            if step.within_limit:
                passed, rate = step, rate * factor
            else:
                failed_rate = rate
                await asyncio.sleep(1)  # let a backlog drain before the next step
        low = passed.rate if passed else 0.0
        for _ in range(bisections if failed_rate else 0):
            assert failed_rate is not None
            middle = (low + failed_rate) / 2
            step = await self.measure(middle, seconds)
            if step.within_limit:
                passed, low = step, middle
            else:
                failed_rate = middle
                await asyncio.sleep(1)
        return passed.deliveries_per_second if passed else 0.0


async def main(arguments: argparse.Namespace) -> None:
    quick = arguments.quick
    clients = arguments.clients
    seconds = arguments.seconds or (3.0 if quick else 8.0)
    ramp_seconds, factor, bisections = (1.5, 2.0, 1) if quick else (4.0, 1.5, 3)
    benches: dict[str, Bench] = {}
    capacities: dict[str, float] = {}
    for kind in ("bare", "rooms"):
        bench = benches[kind] = Bench(kind, clients)
        async with bench.running():
            await bench.measure(10, 0.5, record=False)  # warm-up
            await bench.measure(10, seconds)
            capacities[kind] = await bench.capacity(12, factor, ramp_seconds, bisections)
    sse = benches["sse"] = Bench("sse", clients)
    async with sse.running():
        await sse.measure(10, 0.5, record=False)
        await sse.measure(10, seconds)

    steps = [step for bench in benches.values() for step in bench.steps]
    print_table(
        f"Broadcast to N clients of one room (latency = receive - due time; limit "
        f"{LATENCY_LIMIT_MS:.0f} ms for capacity)",
        ["server", "N", "R/s", "deliveries/s", "p50 ms", "p99 ms", "max ms", "lost",
         "CPU µs/delivery", "GC share", "GC pause ms"],
        [
            [s.server, s.clients, round(s.rate, 1), s.deliveries_per_second, s.p50, s.p99,
             s.longest, s.lost, s.cpu_us_per_delivery, f"{s.gc_share:.0%}", s.gc_longest_ms]
            for s in steps
        ],
    )  # fmt: skip
    at_ten = {kind: bench.steps[0] for kind, bench in benches.items()}
    emit_figures(
        {
            "clients": clients,
            "rt_p50_ms": round(at_ten["rooms"].p50, 1),
            "rt_p99_ms": round(at_ten["rooms"].p99, 1),
            "bare_p50_ms": round(at_ten["bare"].p50, 1),
            "bare_p99_ms": round(at_ten["bare"].p99, 1),
            "rt_capacity_per_s": round(capacities["rooms"]),
            "bare_capacity_per_s": round(capacities["bare"]),
            "rt_capacity_vs_bare_socketio": round(capacities["rooms"] / capacities["bare"], 2)
            if capacities["bare"]
            else None,
            "sse_p50_ms": round(at_ten["sse"].p50, 1),
            "sse_p99_ms": round(at_ten["sse"].p99, 1),
            "rt_lost": at_ten["rooms"].lost + at_ten["sse"].lost,
            "rt_cpu_us_per_delivery": round(at_ten["rooms"].cpu_us_per_delivery, 1),
            "bare_cpu_us_per_delivery": round(at_ten["bare"].cpu_us_per_delivery, 1),
        }
    )


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (under 45 s)")
    parser.add_argument("--clients", type=int, default=1000, help="N, clients per server")
    parser.add_argument("--seconds", type=float, help="length of the R = 10 phase")
    parser.add_argument("--serve", choices=["bare", "rooms", "sse"], help=argparse.SUPPRESS)
    parser.add_argument("--clients-of", choices=["bare", "rooms", "sse"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_arguments()
    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:
        runner = asyncio.run
    if arguments.serve:
        runner(run_server(arguments.port, arguments.serve))
    elif arguments.clients_of:
        runner(run_clients(arguments.port, arguments.clients, arguments.clients_of))
    else:
        asyncio.run(main(arguments))
