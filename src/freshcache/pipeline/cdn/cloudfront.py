"""CloudFront invalidations through boto3, batched within CloudFront's limits."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mypy_boto3_cloudfront import CloudFrontClient

from freshcache.pipeline.cdn.base import (
    _coalesce_paths,
    _is_wildcard,
    _unique,
    _validate_path,
    _with_retries,
)

logger = logging.getLogger(__name__)

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
