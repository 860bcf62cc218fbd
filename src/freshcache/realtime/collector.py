"""Keeping Python's cyclic garbage collector out of the delivery path (opt-in).

A server holding thousands of connections holds millions of long-lived objects. Every
full collection walks all of them: with 1,000 Socket.IO clients that is a pause of
100 ms and more, several times a minute, and it lands on whatever broadcast is under
way. ``gc.freeze()`` moves the objects that exist into a generation the collector never
walks, so full collections only see what is new.

:class:`CollectorFreezer` freezes after start-up and again whenever the number of
connections has grown by a quarter since the last freeze (a young collection first, so
little garbage is frozen with them). Objects of connections that end are freed by
reference counting as usual; the cyclic ones stay frozen until enough connections have
ended, when one full collection (unfreeze, collect, freeze) reclaims them.

The collector is process-wide: enable this in a process that serves real-time clients
(``Realtime(freeze_collector=True)``), not in a library user's process behind its back.
"""

from __future__ import annotations

import gc

__all__ = ["CollectorFreezer"]


class CollectorFreezer:
    """Freezes long-lived objects as connections come, reclaims them as they go.

    ``growth``: the fraction of new connections (since the last freeze) that triggers a
    freeze; ``churn``: the fraction of connections ended (since the last full
    collection) that triggers a full collection; ``minimum``: counts below which
    neither happens.
    """

    def __init__(self, *, growth: float = 0.25, churn: float = 0.5, minimum: int = 64) -> None:
        self.growth = growth
        self.churn = churn
        self.minimum = minimum
        self.connections = 0
        self.frozen_at = 0
        self.ended_since_collect = 0
        self.freezes = 0
        self.full_collections = 0

    def start(self) -> None:
        gc.collect()
        gc.freeze()
        self.freezes += 1

    def stop(self) -> None:
        gc.unfreeze()

    def opened(self) -> None:
        """A connection (Socket.IO or SSE) was opened."""
        self.connections += 1
        if self.connections >= self.minimum and self.connections >= self.frozen_at * (
            1 + self.growth
        ):
            gc.collect(1)
            gc.freeze()
            self.frozen_at = self.connections
            self.freezes += 1

    def closed(self) -> None:
        """A connection ended."""
        self.connections -= 1
        self.ended_since_collect += 1
        if self.ended_since_collect >= max(self.minimum, self.frozen_at * self.churn):
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self.frozen_at = self.connections
            self.ended_since_collect = 0
            self.full_collections += 1
