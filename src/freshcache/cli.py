"""The ``freshcache`` command line.

Commands are grouped in sub-apps (``freshcache rules check FILE``); each command builds
what it needs from its options when it runs, never at import time.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from freshcache.core.keys import KeySpace, commerce_keyspace
from freshcache.core.rules import RuleError, RuleSet

__all__ = ["app"]

app = typer.Typer(
    name="freshcache",
    help="Cache invalidation that stays correct under races.",
    no_args_is_help=True,
)
rules_app = typer.Typer(help="Check and inspect dependency rules.", no_args_is_help=True)
app.add_typer(rules_app, name="rules")

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

    from freshcache.marketplace import Settings, create_app
    from freshcache.marketplace.banner import startup_banner

    try:
        settings = Settings.from_env(demo=demo)
    except ValueError as error:
        Console(stderr=True, soft_wrap=True).print(Text(str(error), style="bold red"))
        raise typer.Exit(2) from None
    url = f"http://{host}:{port}"
    application = create_app(
        settings,
        on_ready=lambda _runtime, tenants: print(
            startup_banner(settings, url, tenants), flush=True
        ),
    )
    uvicorn.run(application, host=host, port=port, log_level="info")
