"""CDN purgers: remove the HTTP responses built from changed data from the caches in front
of the application.

A purger removes responses by tag (the surrogate keys the application sends in its
``xkey`` / ``Surrogate-Key`` headers) or by path. Implementations:

- :class:`VarnishPurger` purges by tag with varnish-modules' xkey and by path with bans
  (``deploy/varnish/default.vcl`` is the matching configuration);
- :class:`CloudFrontPurger` creates CloudFront invalidations through boto3 (CloudFront has
  no tags: a user-supplied function maps each tag to paths);
- :class:`NullPurger` does nothing, for deployments without a CDN;
- :class:`CoalescingPurger` wraps another purger so that a burst of requests for the same
  tags or paths becomes one purge.

Purge only after the database transaction that changed the data has committed. A purge
sent before the commit lets the CDN refetch and store the old data again, and nothing
would purge it afterwards.

Paths start with ``/``. A trailing ``*`` makes a path a prefix (``/products/*``), as in
CloudFront; ``*`` anywhere else is rejected.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

import httpx

if TYPE_CHECKING:
    from mypy_boto3_cloudfront import CloudFrontClient

__all__ = [
    "CdnPurger",
    "CloudFrontPurger",
    "CoalescingPurger",
    "NullPurger",
    "PurgeError",
    "VarnishPurger",
]

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


class _VarnishRefusal(Exception):
    """A Varnish answer that retrying will not change (4xx other than 429)."""


class _VarnishUnavailable(Exception):
    """A Varnish answer worth retrying (5xx, 429)."""


class VarnishPurger:
    """Purges Varnish instances over HTTP, using the requests ``deploy/varnish/default.vcl``
    understands.

    ``admin_urls`` are the HTTP addresses of every Varnish instance (their ``-a`` listeners,
    e.g. ``http://10.0.0.5:6081``), reached from an address their ``purgers`` ACL allows.
    Each purge goes to every instance; a tag purge sends up to ``batch_size`` tags per
    request in one ``xkey-purge`` header of at most ``max_header_length`` characters.
    Paths are sent as bans (a regex in a ``ban-url`` header, batched the same way); a path
    without ``*`` also bans that path with any query string.
    ``soft=True`` expires the tagged objects instead of removing them, so they are served
    stale (for their grace) while Varnish refetches them.

    Connection errors, timeouts (``timeout`` seconds per request), 5xx and 429 answers are
    retried ``retries`` times with exponential backoff starting at ``backoff`` seconds;
    then, or at once for a refusal such as 403, :class:`PurgeError` is raised, naming each
    instance that failed. Environment proxy settings are ignored: purges go straight to
    the instances.
    """

    def __init__(
        self,
        admin_urls: Sequence[str],
        *,
        batch_size: int = 256,
        max_header_length: int = 4000,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        soft: bool = False,
    ) -> None:
        if not admin_urls:
            raise ValueError("VarnishPurger needs at least one Varnish URL")
        if batch_size < 1 or max_header_length < 1 or retries < 0:
            raise ValueError("batch_size and max_header_length must be >= 1, retries >= 0")
        self.admin_urls = list(admin_urls)
        self.batch_size = batch_size
        self.max_header_length = max_header_length
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.soft = soft
        self._client = httpx.AsyncClient(timeout=timeout, trust_env=False)

    async def purge_tags(self, tags: Sequence[str]) -> None:
        """Remove (or with ``soft``, expire) every object carrying any of ``tags``."""
        unique = _unique(_validate_tag(tag) for tag in tags)
        batches = _batches(unique, max_items=self.batch_size, max_length=self.max_header_length)
        soft = {"xkey-soft": "1"} if self.soft else {}
        requests = [("PURGE", {"xkey-purge": " ".join(batch), **soft}) for batch in batches]
        await self._send_everywhere(requests)

    async def purge_paths(self, paths: Sequence[str]) -> None:
        """Ban the objects at ``paths`` (with any query string), or under a ``/prefix*``."""
        patterns = [_path_regex(path) for path in _coalesce_paths(map(_validate_path, paths))]
        # The regex is ^(?:p1|p2|...): 5 characters of frame around the joined patterns.
        batches = _batches(
            patterns, max_items=self.batch_size, max_length=self.max_header_length - 5
        )
        requests = [("BAN", {"ban-url": "^(?:" + "|".join(batch) + ")"}) for batch in batches]
        await self._send_everywhere(requests)

    async def close(self) -> None:
        """Close the HTTP connections."""
        await self._client.aclose()

    async def _send_everywhere(self, requests: list[tuple[str, dict[str, str]]]) -> None:
        if not requests:
            return
        outcomes = await asyncio.gather(
            *(self._send_to_instance(url, requests) for url in self.admin_urls),
            return_exceptions=True,
        )
        failures: list[PurgeError] = []
        for outcome in outcomes:
            if isinstance(outcome, PurgeError):
                failures.append(outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
        if len(failures) == 1:
            raise failures[0]
        if failures:
            raise PurgeError(
                f"{len(failures)} of {len(self.admin_urls)} Varnish instances failed: "
                + "; ".join(str(failure) for failure in failures)
            ) from failures[0]

    async def _send_to_instance(self, url: str, requests: list[tuple[str, dict[str, str]]]) -> None:
        for method, headers in requests:
            purged = await _with_retries(
                functools.partial(self._send_once, url, method, headers),
                is_transient=_is_transient_http_failure,
                retries=self.retries,
                backoff=self.backoff,
                max_backoff=self.max_backoff,
                description=f"Varnish {method} at {url}",
            )
            logger.debug("Varnish %s at %s: %s", method, url, purged)

    async def _send_once(self, url: str, method: str, headers: dict[str, str]) -> str:
        response = await self._client.request(method, url, headers=headers)
        if response.status_code == 403:
            raise _VarnishRefusal(
                f"403 {response.reason_phrase}: is this client's address in the "
                "purgers ACL of the Varnish configuration?"
            )
        if response.status_code == 429 or response.status_code >= 500:
            raise _VarnishUnavailable(f"{response.status_code} {response.reason_phrase}")
        if response.status_code >= 300:
            raise _VarnishRefusal(f"{response.status_code} {response.reason_phrase}")
        return response.reason_phrase


def _is_transient_http_failure(error: Exception) -> bool:
    return isinstance(error, httpx.TransportError | _VarnishUnavailable)


def _path_regex(path: str) -> str:
    """The PCRE2 regex (after the ``^`` anchor) matching an object URL for ``path``."""
    if _is_wildcard(path):
        return re.escape(path[:-1])
    return re.escape(path) + r"(?:\?|$)"


# CloudFront's documented limits: paths per invalidation request, and wildcard paths
# in progress at once (so at most that many in one request).
_CLOUDFRONT_MAX_PATHS = 3000
_CLOUDFRONT_MAX_WILDCARDS = 15
_CLOUDFRONT_TRANSIENT_ERRORS = frozenset(
    {"Throttling", "TooManyInvalidationsInProgress", "ServiceUnavailable", "InternalError"}
)


def _cloudfront_batches(
    paths: Sequence[str],
    *,
    max_paths: int = _CLOUDFRONT_MAX_PATHS,
    max_wildcards: int = _CLOUDFRONT_MAX_WILDCARDS,
) -> list[list[str]]:
    """Split coalesced ``paths`` into invalidation batches within CloudFront's limits.

    Each batch has at most ``max_paths`` paths, of which at most ``max_wildcards`` end in
    ``*``; wildcards are spread so that as few batches as possible are needed.
    """
    wildcards = [path for path in paths if _is_wildcard(path)]
    exact = [path for path in paths if not _is_wildcard(path)]
    batches: list[list[str]] = []
    while wildcards or exact:
        batch = wildcards[:max_wildcards]
        del wildcards[:max_wildcards]
        room = max_paths - len(batch)
        batch.extend(exact[:room])
        del exact[:room]
        batches.append(batch)
    return batches


class CloudFrontPurger:
    """Creates CloudFront invalidations for a distribution, through boto3.

    CloudFront has no tags: ``paths_for_tag(tag)`` returns the paths whose responses carry
    ``tag`` (return ``[]`` for tags that have no page on the CDN). Paths are coalesced
    (duplicates once, paths under a wildcard of the same purge dropped) and sent in
    batches within CloudFront's limits (at most 3,000 paths and 15 wildcards each), one
    batch after another. Each batch has its own ``CallerReference``, kept across its
    retries so a retried request cannot create a second invalidation.

    ``client`` is a boto3 CloudFront client (closing it stays the caller's job); by
    default one is created with boto3's usual configuration (install the ``cdn`` extra).
    boto3 calls block, so they run in a thread.
    ``Throttling``, ``TooManyInvalidationsInProgress`` and other transient errors are
    retried ``retries`` times with exponential backoff (``backoff`` seconds at first, at
    most ``max_backoff``); then :class:`PurgeError` is raised.
    """

    def __init__(
        self,
        distribution_id: str,
        *,
        paths_for_tag: Callable[[str], Iterable[str]],
        client: CloudFrontClient | None = None,
        retries: int = 6,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
    ) -> None:
        # A client passed in belongs to the caller, who closes it.
        self._owns_client = client is None
        if client is None:
            # Imported here so that boto3 is needed only by deployments using CloudFront.
            import boto3

            client = boto3.client("cloudfront")
        self.distribution_id = distribution_id
        self.paths_for_tag = paths_for_tag
        self.client = client
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff

    async def purge_tags(self, tags: Sequence[str]) -> None:
        """Invalidate the paths ``paths_for_tag`` gives for each of ``tags``."""
        await self.purge_paths([path for tag in _unique(tags) for path in self.paths_for_tag(tag)])

    async def purge_paths(self, paths: Sequence[str]) -> None:
        """Invalidate ``paths``, in as many invalidations as CloudFront's limits require."""
        coalesced = _coalesce_paths(_validate_path(path) for path in paths)
        for batch in _cloudfront_batches(coalesced):
            await self._invalidate(batch)

    async def close(self) -> None:
        """Close the boto3 client's connections, if this purger created the client."""
        if self._owns_client:
            await asyncio.to_thread(self.client.close)

    async def _invalidate(self, batch: list[str]) -> None:
        caller_reference = f"freshcache-{uuid.uuid4().hex}"

        async def create_invalidation() -> str:
            response = await asyncio.to_thread(
                self.client.create_invalidation,
                DistributionId=self.distribution_id,
                InvalidationBatch={
                    "Paths": {"Quantity": len(batch), "Items": batch},
                    "CallerReference": caller_reference,
                },
            )
            return response["Invalidation"]["Id"]

        invalidation_id = await _with_retries(
            create_invalidation,
            is_transient=_is_transient_cloudfront_failure,
            retries=self.retries,
            backoff=self.backoff,
            max_backoff=self.max_backoff,
            description=(
                f"CloudFront invalidation of {len(batch)} paths "
                f"on distribution {self.distribution_id}"
            ),
        )
        logger.debug("CloudFront invalidation %s: %d paths", invalidation_id, len(batch))


def _is_transient_cloudfront_failure(error: Exception) -> bool:
    # botocore is imported only when boto3 is in use: this runs after a boto3 call failed.
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotocoreConnectionError

    if isinstance(error, ClientError):
        return error.response.get("Error", {}).get("Code") in _CLOUDFRONT_TRANSIENT_ERRORS
    return isinstance(error, BotocoreConnectionError | HTTPClientError)


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
