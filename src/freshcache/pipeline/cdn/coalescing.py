"""A purger wrapper that turns a burst of purges of the same tags or paths into one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Sequence

from freshcache.pipeline.cdn.base import (
    CdnPurger,
)


class _Window:
    """Items requested during one window, sent together when it ends."""

    def __init__(self, send: Callable[[list[str]], Awaitable[None]], seconds: float) -> None:
        self.send = send
        self.seconds = seconds
        self.pending: dict[str, None] = {}
        self.sent: asyncio.Future[None] | None = None
        self.end_now = asyncio.Event()
        # Strong references: the event loop keeps only weak ones to running tasks.
        self.flushers: set[asyncio.Task[None]] = set()

    async def request(self, items: Iterable[str]) -> None:
        new_items = dict.fromkeys(items)
        if not new_items:
            return
        self.pending.update(new_items)
        if self.sent is None:
            self.sent = asyncio.get_running_loop().create_future()
            self.end_now = asyncio.Event()
            flusher = asyncio.create_task(self._flush_after_window(self.sent, self.end_now))
            self.flushers.add(flusher)
            flusher.add_done_callback(self.flushers.discard)
        # Shielded: one caller giving up must not cancel the purge others wait for.
        await asyncio.shield(self.sent)

    async def flush(self) -> None:
        """End the open window now and wait until every window's purge has finished
        (their errors go to their callers)."""
        self.end_now.set()
        await asyncio.gather(*self.flushers)

    async def _flush_after_window(self, sent: asyncio.Future[None], end_now: asyncio.Event) -> None:
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.seconds):
                    await end_now.wait()
            items = list(self.pending)
            # Requests from now on open the next window, even while this one is being sent.
            self.pending, self.sent = {}, None
            await self.send(items)
        except asyncio.CancelledError:
            sent.cancel()
            raise
        except Exception as error:
            sent.set_exception(error)
        else:
            sent.set_result(None)


class CoalescingPurger:
    """Wraps a purger so that tags and paths requested many times within
    ``window_seconds`` are sent once.

    The first request for a tag or path opens a window; every tag (and, separately, every
    path) requested until it closes is sent to ``inner`` in one call, without duplicates.
    Each caller waits until the purge holding its items has been sent and gets its error
    if it failed, so a caller that acknowledges an event after ``purge_tags`` returns never
    acknowledges an unsent purge. A burst of 10,000 updates to one product is one purge.
    ``close()`` sends what is pending at once, then closes ``inner``.
    """

    def __init__(self, inner: CdnPurger, window_seconds: float = 0.05) -> None:
        if window_seconds < 0:
            raise ValueError("window_seconds must be >= 0")
        self.inner = inner
        self.window_seconds = window_seconds
        self._tags = _Window(inner.purge_tags, window_seconds)
        self._paths = _Window(inner.purge_paths, window_seconds)

    async def purge_tags(self, tags: Sequence[str]) -> None:
        """Purge ``tags`` together with the others requested in the same window."""
        await self._tags.request(tags)

    async def purge_paths(self, paths: Sequence[str]) -> None:
        """Purge ``paths`` together with the others requested in the same window."""
        await self._paths.request(paths)

    async def close(self) -> None:
        """Send the pending purges now, then close the inner purger."""
        await asyncio.gather(self._tags.flush(), self._paths.flush())
        await self.inner.close()
