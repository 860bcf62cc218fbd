"""The service's database: engine set-up for PostgreSQL and SQLite, schema and outbox.

Write transactions go through :meth:`Database.write`: on SQLite it starts them with
``BEGIN IMMEDIATE``, taking the write lock up front, so that two writers never both read
and then fail to upgrade their lock (SQLite would answer "database is locked" at once,
without waiting). PostgreSQL needs nothing of the sort: its row locks serialise the
conditional stock updates.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event, func, select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from freshcache.marketplace.schema import WATCHED_TABLES, metadata
from freshcache.pipeline.outbox import install_outbox

__all__ = ["Database"]

_IMMEDIATE = "freshcache_begin_immediate"
# Any constant distinct from the outbox's own advisory lock.
_SCHEMA_LOCK = 0x66726573686362
# How long a SQLite writer waits for the lock before "database is locked".
_SQLITE_BUSY_SECONDS = 30.0


class Database:
    """The engine, plus transactions for readers and writers."""

    def __init__(self, url: str) -> None:
        self.is_sqlite = url.startswith("sqlite")
        options: dict[str, Any] = {}
        if self.is_sqlite:
            options["connect_args"] = {"timeout": _SQLITE_BUSY_SECONDS}
        else:
            options["pool_size"] = 10
            options["pool_pre_ping"] = True
        self.engine: AsyncEngine = create_async_engine(url, **options)
        if self.is_sqlite:
            _configure_sqlite(self.engine)
        self.writer: AsyncEngine = self.engine.execution_options(**{_IMMEDIATE: True})
        """The engine for transactions that write (``BEGIN IMMEDIATE`` on SQLite)."""

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction: committed when the block ends, rolled back on error."""
        async with self.writer.begin() as connection:
            yield connection

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only transaction."""
        async with self.engine.connect() as connection:
            yield connection

    async def create_schema(self) -> None:
        """Create the tables (if missing) and install the outbox triggers; safe to run
        from several instances at once."""
        async with self.engine.begin() as connection:
            if not self.is_sqlite:
                await connection.execute(select(func.pg_advisory_xact_lock(_SCHEMA_LOCK)))
            await connection.run_sync(metadata.create_all)
        await install_outbox(self.engine, WATCHED_TABLES)

    async def dispose(self) -> None:
        await self.engine.dispose()


def _configure_sqlite(engine: AsyncEngine) -> None:
    # SQLAlchemy's recipe for transactions the driver must not start on its own
    # ("Serializable isolation / Savepoints / Transactional DDL", asyncio version).
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: object) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL: readers do not wait for the writer; foreign keys are off by default.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get(_IMMEDIATE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
