"""An outbox relay in its own process that dies between publishing a batch and marking it
sent, as a relay killed at the worst moment would.

Run as ``python outbox_relay.py DATABASE_URL REDIS_URL TOPIC BATCH_SIZE
--kill-after-publishes N``. It relays batches of BATCH_SIZE rows to TOPIC on a
:class:`~freshcache.pipeline.bus.RedisStreamBus`; the bus SIGKILLs the process as soon as
Redis has accepted the N-th message, before the relay's transaction can mark anything.
The dying is the bus's doing, so the relay under test is the library's, unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

import redis.asyncio as redis
from sqlalchemy.ext.asyncio import create_async_engine

from freshcache.pipeline.bus import RedisStreamBus
from freshcache.pipeline.relay import OutboxRelay


class BusThatDiesAfterPublishing(RedisStreamBus):
    """A Redis Streams bus that kills its process right after the N-th publish returned."""

    def __init__(self, client: redis.Redis, publishes_before_dying: int) -> None:
        super().__init__(client)
        self.publishes_before_dying = publishes_before_dying
        self.published = 0

    async def publish(self, topic: str, payload: bytes) -> str:
        message_id = await super().publish(topic, payload)
        self.published += 1
        if self.published == self.publishes_before_dying:
            os.kill(os.getpid(), signal.SIGKILL)
        return message_id


async def relay(url: str, redis_url: str, topic: str, batch_size: int, kill_after: int) -> None:
    bus = BusThatDiesAfterPublishing(redis.Redis.from_url(redis_url), kill_after)
    outbox_relay = OutboxRelay(create_async_engine(url), bus, topic=topic, batch_size=batch_size)
    while await outbox_relay.relay_once():
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("redis_url")
    parser.add_argument("topic")
    parser.add_argument("batch_size", type=int)
    parser.add_argument("--kill-after-publishes", type=int, required=True)
    arguments = parser.parse_args()
    asyncio.run(
        relay(
            arguments.url,
            arguments.redis_url,
            arguments.topic,
            arguments.batch_size,
            arguments.kill_after_publishes,
        )
    )


if __name__ == "__main__":
    main()
