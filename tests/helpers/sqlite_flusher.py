"""A write-behind flusher in its own process, persisting into a SQLite file, so that a test
can SIGKILL it mid-batch like a crashed worker.

Run as ``python sqlite_flusher.py REDIS_URL DATABASE CONSUMER [options]``. It drains the
default write-behind topic of :func:`freshcache.commerce_keyspace` keys into the table
``writes(key, value, position_ms, position_seq)``, upserting by key and replacing a row
only with a write of a later stream position (a reclaimed old batch may arrive after a
newer one). Each ``persist`` sleeps ``--persist-delay`` seconds first (a slow database).

It prints ``ready`` once its group exists. With ``--stall-after N``, the persist call after
the first N hangs for good (a database call that never returns) after printing
``stalled``; its batch stays pending, as a killed flusher leaves it.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
from contextlib import closing
from pathlib import Path

import orjson
import redis.asyncio as redis

from freshcache.core.keys import commerce_keyspace
from freshcache.pipeline.bus import RedisStreamBus
from freshcache.write_behind import PendingWrite, WriteBehindFlusher

SCHEMA = """
CREATE TABLE IF NOT EXISTS writes (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    position_ms INTEGER NOT NULL,
    position_seq INTEGER NOT NULL
)
"""

UPSERT = """
INSERT INTO writes (key, value, position_ms, position_seq) VALUES (?, ?, ?, ?)
ON CONFLICT (key) DO UPDATE SET
    value = excluded.value,
    position_ms = excluded.position_ms,
    position_seq = excluded.position_seq
WHERE (excluded.position_ms, excluded.position_seq) > (writes.position_ms, writes.position_seq)
"""


def connect(path: Path) -> sqlite3.Connection:
    # WAL lets the test read the file while a flusher writes it.
    database = sqlite3.connect(path, timeout=10)
    database.execute("PRAGMA journal_mode=WAL")
    return database


def upsert(path: Path, writes: list[PendingWrite]) -> None:
    rows = [
        (write.key.name, orjson.dumps(write.value).decode(), *write.position) for write in writes
    ]
    with closing(connect(path)) as database, database:
        database.executemany(UPSERT, rows)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("redis_url")
    parser.add_argument("database", type=Path)
    parser.add_argument("consumer")
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--claim-idle", type=float, default=30.0)
    parser.add_argument("--persist-delay", type=float, default=0.0)
    parser.add_argument("--stall-after", type=int, default=None)
    options = parser.parse_args()

    with closing(connect(options.database)) as database, database:
        database.execute(SCHEMA)
    persisted_batches = 0

    async def persist(writes: list[PendingWrite]) -> None:
        nonlocal persisted_batches
        if options.stall_after is not None and persisted_batches >= options.stall_after:
            print("stalled", flush=True)
            await asyncio.Event().wait()
        await asyncio.sleep(options.persist_delay)
        await asyncio.to_thread(upsert, options.database, writes)
        persisted_batches += 1

    client = redis.Redis.from_url(options.redis_url, socket_timeout=10)
    flusher = WriteBehindFlusher(
        RedisStreamBus(client),
        commerce_keyspace(),
        persist,
        consumer=options.consumer,
        batch_size=options.batch_size,
        claim_idle_seconds=options.claim_idle,
        block_seconds=0.2,
    )
    await flusher.bus.ensure_group(flusher.topic, flusher.group)
    print("ready", flush=True)
    await flusher.run()


if __name__ == "__main__":
    asyncio.run(main())
