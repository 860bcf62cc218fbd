"""The ``freshcache`` command line.

Commands are grouped in sub-apps (``freshcache rules check FILE``); each command builds
what it needs from its options when it runs, never at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from freshcache.core.keys import KeySpace, commerce_keyspace
from freshcache.core.rules import RuleError, RuleSet

if TYPE_CHECKING:
    from freshcache.marketplace import Settings
    from freshcache.pipeline.bus import RedisStreamBus
    from freshcache.pipeline.worker import DeadLetter

__all__ = ["app"]

app = typer.Typer(
    name="freshcache",
    help="Cache invalidation that stays correct under races.",
    no_args_is_help=True,
)
rules_app = typer.Typer(help="Check and inspect dependency rules.", no_args_is_help=True)
app.add_typer(rules_app, name="rules")
deadletters_app = typer.Typer(
    help="Inspect and replay events the workers set aside.", no_args_is_help=True
)
app.add_typer(deadletters_app, name="deadletters")

KeySpaceOption = Annotated[
    str | None,
    typer.Option(
        "--keyspace",
        metavar="MODULE:FUNCTION",
        help="A function returning the KeySpace to compile against, importable from the "
        "current directory. Default: freshcache's commerce_keyspace().",
    ),
]


def load_keyspace(spec: str | None) -> KeySpace:
    """The KeySpace returned by the ``module:function`` named in ``spec`` (or the commerce one)."""
    if spec is None:
        return commerce_keyspace()
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise typer.BadParameter(f"expected MODULE:FUNCTION, got {spec!r}", param_hint="--keyspace")
    # Like uvicorn's app argument: the user's modules live in the current directory.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise typer.BadParameter(str(error), param_hint="--keyspace") from None
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise typer.BadParameter(
            f"{module_name} has no function {function_name!r}", param_hint="--keyspace"
        )
    keyspace = factory()
    if not isinstance(keyspace, KeySpace):
        raise typer.BadParameter(
            f"{spec} returned {type(keyspace).__name__}, not a KeySpace", param_hint="--keyspace"
        )
    return keyspace


def _console_for(*tables: Table) -> Console:
    """A stdout console; when piped (a file, a CI log), wide enough for rows to stay whole."""
    console = Console()
    if console.is_terminal:
        return console
    unbounded = console.options.update(max_width=10_000)
    widest = max(console.measure(table, options=unbounded).maximum for table in tables)
    return Console(width=max(console.width, widest))


@rules_app.command("check")
def rules_check(
    file: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, readable=True, help="The rules YAML file."),
    ],
    keyspace: KeySpaceOption = None,
) -> None:
    """Compile a rules file and show what each pattern compiles to; exit 1 on an error."""
    try:
        rules = RuleSet.from_yaml(file.read_text(encoding="utf-8"), load_keyspace(keyspace))
    except (RuleError, UnicodeDecodeError) as error:
        # soft_wrap: the message stays one line, whole, for a terminal to wrap or a grep to find.
        Console(stderr=True, soft_wrap=True).print(Text(f"{file}: {error}", style="bold red"))
        raise typer.Exit(1) from None

    patterns = Table(title=f"Patterns in {file}")
    patterns.add_column("Trigger", style="cyan", overflow="fold")
    patterns.add_column("Pattern", overflow="fold")
    patterns.add_column("Compiled to", style="green", overflow="fold")
    rows = rules.describe()
    for index, row in enumerate(rows):
        first_of_trigger = index == 0 or rows[index - 1].trigger != row.trigger
        last_of_trigger = index == len(rows) - 1 or rows[index + 1].trigger != row.trigger
        patterns.add_row(
            row.trigger if first_of_trigger else "",
            row.pattern,
            "\n".join(row.compiled_to),
            end_section=last_of_trigger,
        )

    events = Table(title="Event types")
    events.add_column("Event type", style="cyan")
    events.add_column("Fires")
    for event_type, names in rules.events.items():
        events.add_row(event_type, ", ".join(names) or "(only its affectedCaches)")
    out = _console_for(patterns, events)
    out.print(patterns)
    out.print(events)

    for name in rules.unused_triggers:
        out.print(Text(f"note: no event type fires {name}", style="yellow"))
    summary = f"ok: {len(rows)} patterns in {len(rules.triggers)} triggers"
    out.print(Text(summary, style="bold green"))


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    demo: Annotated[
        bool, typer.Option("--demo/--no-demo", help="Create demo data in an empty database.")
    ] = True,
) -> None:
    """Run the marketplace service.

    With nothing configured it runs embedded (SQLite in FRESHCACHE_DATA_DIR, default
    ./.freshcache; in-process cache, bus, relay and worker). FRESHCACHE_DATABASE_URL
    (PostgreSQL) and FRESHCACHE_REDIS_URL switch it to production, where several
    instances share the database and Redis.
    """
    import uvicorn

    from freshcache.marketplace import create_app
    from freshcache.marketplace.banner import startup_banner

    settings = _settings_or_exit(demo=demo)
    url = f"http://{host}:{port}"
    application = create_app(
        settings,
        on_ready=lambda _runtime, tenants: print(
            startup_banner(settings, url, tenants), flush=True
        ),
    )
    # Real-time messages are encoded once for all clients; per-connection compression
    # would redo it for each one (see freshcache.realtime.layer).
    uvicorn.run(application, host=host, port=port, log_level="info", ws_per_message_deflate=False)


def _settings_or_exit(**overrides: Any) -> Settings:
    from freshcache.marketplace import Settings

    try:
        return Settings.from_env(**overrides)
    except ValueError as error:
        Console(stderr=True, soft_wrap=True).print(Text(str(error), style="bold red"))
        raise typer.Exit(2) from None


def _redis_bus_or_exit() -> RedisStreamBus:
    from freshcache.pipeline.bus import RedisStreamBus

    url = os.environ.get("FRESHCACHE_REDIS_URL")
    if not url:
        Console(stderr=True).print(
            Text("FRESHCACHE_REDIS_URL is not set: the embedded bus lives inside `serve`.", "red")
        )
        raise typer.Exit(2)
    import redis.asyncio as redis

    return RedisStreamBus(redis.Redis.from_url(url, socket_connect_timeout=2.0))


@app.command("worker")
def worker() -> None:
    """Run the invalidation pipeline without serving HTTP: the outbox relay and a worker.

    For production (FRESHCACHE_DATABASE_URL and FRESHCACHE_REDIS_URL set): run as many as
    you like; `serve` instances then run with FRESHCACHE_RUN_PIPELINE=0. Stops on Ctrl-C.
    """
    from freshcache.marketplace.auth import TenantDirectory
    from freshcache.marketplace.live import LiveSettings, LiveUpdates
    from freshcache.marketplace.runtime import Runtime

    settings = _settings_or_exit(demo=False, run_pipeline=True)
    if settings.embedded:
        Console(stderr=True).print(
            Text("set FRESHCACHE_REDIS_URL: an embedded `serve` runs its own worker", "red")
        )
        raise typer.Exit(2)

    async def run() -> None:
        # The worker publishes the real-time updates of the changes it applies (through
        # Redis, to every `serve` instance's clients).
        live = LiveUpdates(settings, LiveSettings.from_env())
        runtime = Runtime(settings, listeners=[live.publish_changes])
        live.bind(runtime, TenantDirectory(runtime))
        await runtime.start()
        await live.start()
        print(f"worker {runtime.worker.consumer} running; Ctrl-C stops it", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            try:
                await runtime.stop()  # the worker first: it publishes live updates
            finally:
                await live.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


@deadletters_app.command("list")
def deadletters_list(
    count: Annotated[int, typer.Option(help="How many to show, oldest first.")] = 20,
) -> None:
    """Show the events set aside by workers (malformed, or failing too often)."""
    from freshcache.pipeline.worker import list_dead_letters

    async def run() -> list[DeadLetter]:
        bus = _redis_bus_or_exit()
        try:
            return await list_dead_letters(bus, count)
        finally:
            await bus.close()

    letters = asyncio.run(run())
    table = Table(title=f"Dead letters ({len(letters)} shown)")
    table.add_column("Id")
    table.add_column("Failed at")
    table.add_column("Reason", style="red", overflow="fold")
    table.add_column("Payload", overflow="fold")
    for letter in letters:
        failed_at = datetime.fromtimestamp(letter.failed_at, UTC).isoformat(timespec="seconds")
        payload = letter.payload.decode("utf-8", "replace")
        table.add_row(letter.message_id, failed_at, letter.reason, payload)
    _console_for(table).print(table)


@deadletters_app.command("replay")
def deadletters_replay(
    count: Annotated[int, typer.Option(help="How many to replay, oldest first.")] = 100,
) -> None:
    """Put dead letters back on the topic they came from (after fixing the cause)."""
    from freshcache.pipeline.worker import replay_dead_letters

    async def run() -> int:
        bus = _redis_bus_or_exit()
        try:
            return len(await replay_dead_letters(bus, count))
        finally:
            await bus.close()

    print(f"replayed {asyncio.run(run())} dead letters")


@app.command("invalidate")
def invalidate(
    event: Annotated[str, typer.Argument(help="An application event, as the seed's JSON.")],
) -> None:
    """Validate an event and publish it to the bus for the workers (production)."""
    from freshcache.core.events import InvalidEvent, parse_event
    from freshcache.pipeline.bus import EVENTS_TOPIC

    try:
        parsed = parse_event(event)
    except InvalidEvent as error:
        Console(stderr=True, soft_wrap=True).print(Text(f"invalid event: {error}", "bold red"))
        raise typer.Exit(1) from None

    async def run() -> str:
        bus = _redis_bus_or_exit()
        try:
            return await bus.publish(EVENTS_TOPIC, parsed.to_json())
        finally:
            await bus.close()

    print(f"published {parsed.event_type} {parsed.event_id} as {asyncio.run(run())}")


@app.command("loadgen")
def loadgen(
    token: Annotated[
        list[str], typer.Option("--token", help="A tenant's API key; repeat for each tenant.")
    ],
    url: Annotated[str, typer.Option(help="The service's base URL.")] = "http://127.0.0.1:8000",
    admin_token: Annotated[
        str | None, typer.Option(help="The admin token: adds category renames to the writes.")
    ] = None,
    requests: Annotated[
        int | None, typer.Option(min=1, help="Requests to measure (default 10,000).")
    ] = None,
    duration: Annotated[
        float | None, typer.Option(min=0.001, help="Seconds to measure, instead of --requests.")
    ] = None,
    warmup: Annotated[int, typer.Option(min=0, help="Requests sent first, not counted.")] = 0,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at once.")] = 32,
    write_ratio: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="The share of writes in the mix.")
    ] = 0.02,
    seed: Annotated[int, typer.Option(help="Seed of the mix's random draws.")] = 0,
    json_line: Annotated[
        bool, typer.Option("--json", help="Also print the figures as one JSON line.")
    ] = False,
) -> None:
    """Drive realistic traffic against a running service and report hit ratios and latency.

    Discovers every product the tokens' tenants have, creates a few users per tenant,
    then sends Zipf-distributed reads (products, listing pages, marketplace search, nearby
    shops, categories, profiles, dashboard) and writes (product edits, stock, orders).
    It changes data: point it at a deployment whose data may change. Exit 1 on errors.
    """
    import json

    from freshcache.loadgen import LoadConfig, LoadgenError, run_load

    if requests is not None and duration is not None:
        raise typer.BadParameter("give --requests or --duration, not both")
    try:
        config = LoadConfig(
            url=url,
            tokens=tuple(token),
            admin_token=admin_token,
            requests=requests or 10_000,
            duration=duration,
            warmup=warmup,
            concurrency=concurrency,
            write_ratio=write_ratio,
            seed=seed,
        )
        report = asyncio.run(run_load(config, progress=Console(stderr=True)))
    except LoadgenError as error:
        Console(stderr=True, soft_wrap=True).print(Text(str(error), style="bold red"))
        raise typer.Exit(2) from None
    table = report.table()
    _console_for(table).print(table)
    errors = Console(stderr=True, soft_wrap=True)
    for sample in report.error_samples:
        errors.print(Text(f"error: {sample}", style="red"))
    if json_line:
        print(json.dumps(report.figures()), flush=True)
    if report.total.errors:
        raise typer.Exit(1)
