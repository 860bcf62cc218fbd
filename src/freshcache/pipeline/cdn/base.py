"""The purger contract, input checks and the retry and batching helpers the purgers share."""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol, TypeVar

logger = logging.getLogger(__name__)

_Result = TypeVar("_Result")

# Printable ASCII without space and without the separators xkey splits on (space, comma).
_TAG_PATTERN = re.compile(r"[\x21-\x2b\x2d-\x7e]+")
# Printable ASCII without space and without '"', which Varnish's ban parser treats as a
# quote; other characters must be percent-encoded, as in any URL.
_PATH_PATTERN = re.compile(r"/[\x21\x23-\x7e]*")


class PurgeError(RuntimeError):
    """A purge that failed: after its retries for transient failures, or at once for a
    refusal that retrying cannot fix (e.g. a client outside Varnish's purge ACL)."""


class CdnPurger(Protocol):
    """Removes cached HTTP responses from a CDN or HTTP cache.

    Call it only after the change's database transaction has committed. Both methods
    return once the CDN has accepted the purge and raise :class:`PurgeError` when it could
    not be sent, so a pipeline worker can retry the event instead of acknowledging it.
    """

    async def purge_tags(self, tags: Sequence[str]) -> None:
        """Remove every response carrying any of these tags (surrogate keys)."""
        ...

    async def purge_paths(self, paths: Sequence[str]) -> None:
        """Remove the responses for these paths (``/a/b``, or a prefix ``/a/*``)."""
        ...

    async def close(self) -> None:
        """Send what is pending and release connections."""
        ...


class NullPurger:
    """A purger for deployments without a CDN: every purge succeeds and does nothing."""

    async def purge_tags(self, tags: Sequence[str]) -> None:
        """Do nothing."""

    async def purge_paths(self, paths: Sequence[str]) -> None:
        """Do nothing."""

    async def close(self) -> None:
        """Do nothing."""


def _validate_tag(tag: str) -> str:
    """Return ``tag`` if it can travel in an xkey header, else raise ``ValueError``.

    xkey splits its headers on spaces and commas, so a tag containing either would purge
    other tags' objects.
    """
    if not _TAG_PATTERN.fullmatch(tag):
        raise ValueError(
            f"tag {tag!r} cannot be a surrogate key: use printable ASCII without spaces or commas"
        )
    return tag


def _validate_path(path: str) -> str:
    """Return ``path`` if it is a valid purge path, else raise ``ValueError``."""
    if not _PATH_PATTERN.fullmatch(path):
        raise ValueError(
            f"path {path!r} must start with '/' and contain only printable ASCII without "
            "spaces or '\"' (percent-encode the rest)"
        )
    if "*" in path[:-1]:
        raise ValueError(f"path {path!r}: '*' is only allowed as the last character")
    return path


def _is_wildcard(path: str) -> bool:
    """Whether ``path`` is a prefix (ends with ``*``)."""
    return path.endswith("*")


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _coalesce_paths(paths: Iterable[str]) -> list[str]:
    """The paths without duplicates and without those a wildcard among them covers.

    ``/a/*`` covers ``/a/b``, ``/a/`` and ``/a/b/*``; order is kept.
    """
    unique = _unique(paths)
    prefixes = [path[:-1] for path in unique if _is_wildcard(path)]

    def covered(path: str) -> bool:
        own_prefix = path[:-1] if _is_wildcard(path) else None
        return any(path.startswith(prefix) and prefix != own_prefix for prefix in prefixes)

    return [path for path in unique if not covered(path)]


def _backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter, so retrying clients do not retry in lockstep."""
    delay: float = min(cap, base * 2**attempt)
    return delay / 2 + random.uniform(0, delay / 2)


async def _with_retries(
    operation: Callable[[], Awaitable[_Result]],
    *,
    is_transient: Callable[[Exception], bool],
    retries: int,
    backoff: float,
    max_backoff: float,
    description: str,
) -> _Result:
    """Run ``operation``, retrying transient failures ``retries`` times with backoff."""
    attempt = 0
    while True:
        try:
            return await operation()
        except Exception as error:
            if not is_transient(error):
                raise PurgeError(f"{description} failed: {error}") from error
            if attempt == retries:
                raise PurgeError(
                    f"{description} failed after {retries + 1} attempts: "
                    f"{type(error).__name__}: {error}"
                ) from error
            delay = _backoff_delay(attempt, backoff, max_backoff)
            logger.warning("%s failed (%s), retrying in %.2fs", description, error, delay)
            await asyncio.sleep(delay)
            attempt += 1


def _batches(items: Sequence[str], *, max_items: int, max_length: int) -> list[list[str]]:
    """Split ``items`` into batches of at most ``max_items`` whose length, joined with a
    one-character separator, is at most ``max_length``."""
    batches: list[list[str]] = []
    current: list[str] = []
    length = 0
    for item in items:
        if len(item) > max_length:
            raise ValueError(f"{item[:60]!r}… is longer than the {max_length}-character limit")
        added = len(item) + (1 if current else 0)
        if current and (len(current) == max_items or length + added > max_length):
            batches.append(current)
            current, length, added = [], 0, len(item)
        current.append(item)
        length += added
    if current:
        batches.append(current)
    return batches
