"""The transactional outbox: database changes become events in the same transaction.

Declare the tables whose changes matter as :class:`WatchedTable` and call
:func:`install_outbox`. It creates the ``freshcache_outbox`` table and, on each watched
table, row triggers that write one event per inserted, updated or deleted row into it.
Because the database itself writes the event, every writer is covered (the application,
``psql``, a migration, another service), and the event commits or rolls back with the
change that caused it. :class:`~freshcache.pipeline.relay.OutboxRelay` then moves the rows
to the bus. Application events that no table change expresses enter the same outbox
through :func:`enqueue_event`, inside the caller's transaction.

Backends:

- PostgreSQL (13 or later, through asyncpg): a PL/pgSQL trigger function per table builds
  the event with ``json_build_object`` (``gen_random_uuid()`` ids) and sends
  ``pg_notify('freshcache_outbox', '')`` so that a listening relay wakes at commit.
- SQLite (3.38 or later, through aiosqlite): ``AFTER INSERT/UPDATE/DELETE`` triggers build
  it with ``json_object``, ids from ``randomblob``; SQLite cannot notify other processes,
  so the relay polls.

Events have the specification's form and pass :func:`~freshcache.core.events.parse_event`::

    {"eventId": "5b0e...", "eventType": "product.updated", "tenantId": "t1",
     "productId": "42", "categoryId": "7", "previousCategoryId": "3", "newStock": 5,
     "affectedCaches": [], "timestamp": "2024-09-20T10:30:00.123456Z"}

``affectedCaches`` is empty: the dependency rules compute what to invalidate from the
event's identifiers. Fields whose column is NULL are left out.

Not captured: ``TRUNCATE`` (no row triggers fire) and changes made with triggers disabled
(``session_replication_role = replica``, bulk loads that drop triggers). Removing a table
from the declaration does not drop its triggers: drop them with the table or by hand
(``freshcache_outbox_<table>`` function on PostgreSQL, ``freshcache_outbox_<table>_<op>``
triggers on SQLite).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    func,
    insert,
    select,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from freshcache.core.events import Event, is_event_type

__all__ = [
    "NOTIFY_CHANNEL",
    "OUTBOX_TABLE",
    "WatchedTable",
    "enqueue_event",
    "install_outbox",
    "outbox_table",
]

OUTBOX_TABLE = "freshcache_outbox"
NOTIFY_CHANNEL = "freshcache_outbox"
"""The PostgreSQL channel the triggers notify at commit; relays LISTEN on it."""

_metadata = MetaData()
outbox_table = Table(
    OUTBOX_TABLE,
    _metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("payload", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("sent_at", DateTime(timezone=True), nullable=True),
)
"""The outbox: ``payload`` is the event's JSON; ``sent_at`` is set once the bus has it."""

# The relay's query reads unsent rows in id order; sent rows are many and irrelevant to it.
Index(
    f"{OUTBOX_TABLE}_unsent",
    outbox_table.c.id,
    postgresql_where=outbox_table.c.sent_at.is_(None),
    sqlite_where=outbox_table.c.sent_at.is_(None),
)

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NAME_PART = re.compile(r"^[a-z][A-Za-z0-9_]*$")
_OPERATIONS = ("INSERT", "UPDATE", "DELETE")
_RESERVED_FIELDS = frozenset({"eventId", "eventType", "tenantId", "timestamp", "affectedCaches"})
# PostgreSQL truncates longer identifiers, which would make two names collide.
_MAX_IDENTIFIER = 63
_FUNCTION_PREFIX = "freshcache_outbox_"
# json_build_object takes at most 100 arguments: 50 key/value pairs.
_MAX_FIELDS = 50
# Serializes concurrent installs: CREATE OR REPLACE FUNCTION is not safe to race.
_INSTALL_LOCK = 0x66726573686361


def _frozen(mapping: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, slots=True)
class WatchedTable:
    """A table whose row changes become events.

    - ``table``: the table's name as stored (names are quoted in the generated SQL, so on
      PostgreSQL an unquoted ``CREATE TABLE Products`` is ``products``). At most 45
      characters (PostgreSQL names the trigger function after it).
    - ``entity``: the event type's first part: ``product`` gives ``product.updated``.
    - ``tenant_column``: the column holding the tenant; its value becomes ``tenantId``.
    - ``id_columns``: column -> event field, e.g. ``{"id": "productId"}``; the values are
      sent as strings.
    - ``extra_columns``: more identifiers the rules need, e.g. ``{"category_id":
      "categoryId"}``, also as strings. On UPDATE, an id or extra column whose value
      changed is also sent with its old value, under ``previous`` + the field name
      (``previousCategoryId``): a product moving category makes both categories stale.
    - ``value_columns``: column -> field sent with its JSON value (numbers stay numbers),
      e.g. ``{"stock": "newStock"}``. Their field names must not end in ``Id`` (events
      require those to be strings).
    - ``operations``: which operations produce events, and the action each is named, e.g.
      ``{"INSERT": "created", "UPDATE": "updated", "DELETE": "deleted"}``. INSERT and
      UPDATE report the new row, DELETE the old one.
    - ``only_when_changed``: when given, an UPDATE produces an event only if one of these
      columns changed (``IS DISTINCT FROM``); otherwise every updated row does, even one
      updated to the same values.
    """

    table: str
    entity: str
    tenant_column: str
    # Mappings are left out of the hash (they are not hashable); table names it anyway.
    id_columns: Mapping[str, str] = field(hash=False)
    extra_columns: Mapping[str, str] = field(default_factory=dict, hash=False)
    value_columns: Mapping[str, str] = field(default_factory=dict, hash=False)
    operations: Mapping[str, str] = field(
        default_factory=lambda: {"INSERT": "created", "UPDATE": "updated", "DELETE": "deleted"},
        hash=False,
    )
    only_when_changed: Sequence[str] = ()

    def __post_init__(self) -> None:
        for name in ("id_columns", "extra_columns", "value_columns", "operations"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))
        object.__setattr__(self, "only_when_changed", tuple(self.only_when_changed))
        self._validate()

    def _validate(self) -> None:
        _check_identifier("table", self.table)
        if len(_FUNCTION_PREFIX + self.table) > _MAX_IDENTIFIER:
            raise ValueError(
                f"table: {self.table!r} is too long "
                f"(at most {_MAX_IDENTIFIER - len(_FUNCTION_PREFIX)} characters)"
            )
        if self.table == OUTBOX_TABLE:
            raise ValueError(f"table: the outbox itself ({OUTBOX_TABLE}) cannot be watched")
        if not _NAME_PART.match(self.entity):
            raise ValueError(f"entity: must look like 'product', got {self.entity!r}")
        _check_identifier("tenant_column", self.tenant_column)
        if not self.operations:
            raise ValueError("operations: name at least one of INSERT, UPDATE, DELETE")
        for operation, action in self.operations.items():
            if operation not in _OPERATIONS:
                raise ValueError(f"operations: {operation!r} is not one of {_OPERATIONS}")
            if not is_event_type(f"{self.entity}.{action}"):
                raise ValueError(f"operations: action must look like 'updated', got {action!r}")
        fields: list[str] = []
        for option in ("id_columns", "extra_columns", "value_columns"):
            for column, field_name in getattr(self, option).items():
                _check_identifier(option, column)
                _check_identifier(option, field_name)
                fields.append(field_name)
        fields += self.previous_fields.values()
        for field_name in self.value_columns.values():
            if field_name.endswith("Id"):
                raise ValueError(
                    f"value_columns: {field_name!r} ends in 'Id', which events require to "
                    "be a string; declare it in id_columns or extra_columns"
                )
        clashing = sorted({name for name in fields if fields.count(name) > 1})
        clashing += sorted(_RESERVED_FIELDS.intersection(fields))
        if clashing:
            raise ValueError(f"field {clashing[0]!r} is reserved or declared twice")
        if len(fields) + len(_RESERVED_FIELDS) > _MAX_FIELDS:
            raise ValueError(f"too many fields: an event carries at most {_MAX_FIELDS}")
        for column in self.only_when_changed:
            _check_identifier("only_when_changed", column)
        if self.only_when_changed and "UPDATE" not in self.operations:
            raise ValueError("only_when_changed: applies to UPDATE, which is not watched")

    @property
    def string_columns(self) -> Mapping[str, str]:
        """Every column sent as a string (ids, then extras), by event field."""
        return {**self.id_columns, **self.extra_columns}

    @property
    def previous_fields(self) -> Mapping[str, str]:
        """Column -> field carrying its old value when an UPDATE changed it."""
        return {
            column: "previous" + name[0].upper() + name[1:]
            for column, name in self.string_columns.items()
        }


def _check_identifier(option: str, name: str) -> None:
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise ValueError(f"{option}: {name!r} is not a plain identifier ([A-Za-z_][A-Za-z0-9_]*)")
    if len(name) > _MAX_IDENTIFIER:
        raise ValueError(f"{option}: {name!r} is longer than {_MAX_IDENTIFIER} characters")


def _quoted(identifier: str) -> str:
    # Quoting keeps keywords (e.g. a column named "order") usable and the case as given;
    # doubling quotes covers the schema name, which comes from the database unvalidated.
    return '"' + identifier.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


async def install_outbox(engine: AsyncEngine, watched_tables: Iterable[WatchedTable]) -> None:
    """Create the outbox table and the triggers of ``watched_tables`` (idempotent).

    Runs in one transaction. Existing triggers of these tables are replaced, so running it
    again after changing a declaration updates the events; an operation removed from
    ``operations`` loses its trigger. The watched tables must exist.
    """
    dialect = engine.dialect.name
    if dialect not in ("postgresql", "sqlite"):
        raise ValueError(f"the outbox supports postgresql and sqlite, not {dialect}")
    outbox = _quoted(OUTBOX_TABLE)
    async with engine.begin() as connection:
        if dialect == "postgresql":
            await connection.execute(select(func.pg_advisory_xact_lock(_INSTALL_LOCK)))
            # The trigger runs with the writer's search_path, which may not include the
            # schema the outbox is created in: name it in full.
            schema = await connection.scalar(select(func.current_schema()))
            outbox = f"{_quoted(str(schema))}.{_quoted(OUTBOX_TABLE)}"
        await connection.run_sync(_metadata.create_all)
        for watched in watched_tables:
            statements = (
                _postgres_statements(watched, outbox)
                if dialect == "postgresql"
                else _sqlite_statements(watched)
            )
            # Driver-level execution: the SQL holds colons and percent signs that
            # SQLAlchemy's text() would read as parameters.
            for statement in statements:
                await connection.exec_driver_sql(statement)


async def enqueue_event(connection: AsyncConnection, event: Event) -> None:
    """Add an application event to the outbox in the caller's transaction: it reaches the
    bus if and only if that transaction commits. With an ``AsyncSession``, pass
    ``await session.connection()``."""
    await connection.execute(insert(outbox_table).values(payload=event.to_json().decode()))
    if connection.dialect.name == "postgresql":
        await connection.execute(select(func.pg_notify(NOTIFY_CHANNEL, "")))


# -- PostgreSQL ---------------------------------------------------------------------------

_PG_TIMESTAMP = "to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"


def _postgres_event(watched: WatchedTable, operation: str, outbox: str) -> str:
    row = "OLD" if operation == "DELETE" else "NEW"
    pairs = [
        ("eventId", "gen_random_uuid()::text"),
        ("eventType", _literal(f"{watched.entity}.{watched.operations[operation]}")),
        ("tenantId", f"{row}.{_quoted(watched.tenant_column)}::text"),
    ]
    pairs += [
        (name, f"{row}.{_quoted(column)}::text") for column, name in watched.string_columns.items()
    ]
    pairs += [(name, f"{row}.{_quoted(column)}") for column, name in watched.value_columns.items()]
    if operation == "UPDATE":
        pairs += [
            (
                name,
                f"CASE WHEN OLD.{_quoted(column)} IS DISTINCT FROM NEW.{_quoted(column)} "
                f"THEN OLD.{_quoted(column)}::text END",
            )
            for column, name in watched.previous_fields.items()
        ]
    pairs += [("affectedCaches", "json_build_array()"), ("timestamp", _PG_TIMESTAMP)]
    arguments = ",\n                ".join(f"{_literal(name)}, {value}" for name, value in pairs)
    return (
        f"INSERT INTO {outbox} (payload) VALUES (json_strip_nulls(json_build_object(\n"
        f"                {arguments}\n            ))::text);"
    )


def _changed_condition(columns: Sequence[str], different: str) -> str:
    return " OR ".join(
        f"OLD.{_quoted(column)} {different} NEW.{_quoted(column)}" for column in columns
    )


def _postgres_statements(watched: WatchedTable, outbox: str) -> list[str]:
    function = _quoted(_FUNCTION_PREFIX + watched.table)
    table = _quoted(watched.table)
    branches = "\n        ".join(
        f"{'IF' if number == 0 else 'ELSIF'} TG_OP = {_literal(operation)} THEN\n"
        f"            {_postgres_event(watched, operation, outbox)}"
        for number, operation in enumerate(watched.operations)
    )
    statements = [
        f"""CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
LANGUAGE plpgsql AS $freshcache$
    BEGIN
        {branches}
        END IF;
        PERFORM pg_notify({_literal(NOTIFY_CHANNEL)}, '');
        RETURN NULL;
    END
$freshcache$"""
    ]
    for operation in _OPERATIONS:
        trigger = _quoted(f"freshcache_outbox_{operation.lower()}")
        statements.append(f"DROP TRIGGER IF EXISTS {trigger} ON {table}")
        if operation not in watched.operations:
            continue
        event = operation
        condition = ""
        if operation == "UPDATE" and watched.only_when_changed:
            event += " OF " + ", ".join(map(_quoted, watched.only_when_changed))
            condition = (
                f" WHEN ({_changed_condition(watched.only_when_changed, 'IS DISTINCT FROM')})"
            )
        statements.append(
            f"CREATE TRIGGER {trigger} AFTER {event} ON {table} FOR EACH ROW{condition} "
            f"EXECUTE FUNCTION {function}()"
        )
    return statements


# -- SQLite -------------------------------------------------------------------------------

# A random (version 4) UUID: SQLite has no function for it.
_SQLITE_UUID = (
    "(SELECT substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-4' || substr(h, 14, 3) || '-' "
    "|| substr('89ab', 1 + (random() & 3), 1) || substr(h, 18, 3) || '-' || substr(h, 21, 12) "
    "FROM (SELECT lower(hex(randomblob(16))) AS h))"
)
_SQLITE_TIMESTAMP = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"


def _sqlite_event(watched: WatchedTable, operation: str) -> str:
    row = "OLD" if operation == "DELETE" else "NEW"
    pairs = [
        ("eventId", _SQLITE_UUID),
        ("eventType", _literal(f"{watched.entity}.{watched.operations[operation]}")),
        ("tenantId", f"CAST({row}.{_quoted(watched.tenant_column)} AS TEXT)"),
    ]
    pairs += [
        (name, f"CAST({row}.{_quoted(column)} AS TEXT)")
        for column, name in watched.string_columns.items()
    ]
    pairs += [(name, f"{row}.{_quoted(column)}") for column, name in watched.value_columns.items()]
    if operation == "UPDATE":
        pairs += [
            (
                name,
                f"CASE WHEN OLD.{_quoted(column)} IS NOT NEW.{_quoted(column)} "
                f"THEN CAST(OLD.{_quoted(column)} AS TEXT) END",
            )
            for column, name in watched.previous_fields.items()
        ]
    pairs += [("affectedCaches", "json_array()"), ("timestamp", _SQLITE_TIMESTAMP)]
    arguments = ",\n        ".join(f"{_literal(name)}, {value}" for name, value in pairs)
    # json_patch onto an empty object drops the null members, as json_strip_nulls does.
    return (
        f"INSERT INTO {OUTBOX_TABLE} (payload) VALUES (json_patch('{{}}', json_object(\n"
        f"        {arguments}\n    )));"
    )


def _sqlite_statements(watched: WatchedTable) -> list[str]:
    table = _quoted(watched.table)
    statements = []
    for operation in _OPERATIONS:
        trigger = _quoted(f"freshcache_outbox_{watched.table}_{operation.lower()}")
        statements.append(f"DROP TRIGGER IF EXISTS {trigger}")
        if operation not in watched.operations:
            continue
        event = operation
        condition = ""
        if operation == "UPDATE" and watched.only_when_changed:
            event += " OF " + ", ".join(map(_quoted, watched.only_when_changed))
            condition = f" WHEN {_changed_condition(watched.only_when_changed, 'IS NOT')}"
        statements.append(
            f"CREATE TRIGGER {trigger} AFTER {event} ON {table} FOR EACH ROW{condition}\n"
            f"BEGIN\n    {_sqlite_event(watched, operation)}\nEND"
        )
    return statements
