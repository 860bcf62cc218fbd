"""Purges from Varnish: by surrogate key with varnish-modules' xkey, by path with bans
(``deploy/varnish/default.vcl`` is the matching configuration)."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Sequence

import httpx

from freshcache.pipeline.cdn.base import (
    PurgeError,
    _batches,
    _coalesce_paths,
    _is_wildcard,
    _unique,
    _validate_path,
    _validate_tag,
    _with_retries,
)

logger = logging.getLogger(__name__)


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
