"""CDN purgers without a CDN server: CloudFront request shapes (boto3 with botocore's
Stubber standing in for AWS), CoalescingPurger, and VarnishPurger's failures.
VarnishPurger against a real varnishd is in test_varnish.py."""

from __future__ import annotations

import asyncio
import copy
import datetime
from collections.abc import Sequence
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from mypy_boto3_cloudfront import CloudFrontClient

from freshcache.pipeline.cdn import (
    CdnPurger,
    CloudFrontPurger,
    CoalescingPurger,
    NullPurger,
    PurgeError,
    VarnishPurger,
)
from freshcache.testing import free_port


class StubbedCloudFront:
    """A real boto3 CloudFront client whose CreateInvalidation calls are answered by
    botocore's Stubber (after boto3 validated them against the API model) and recorded."""

    def __init__(self) -> None:
        self.client: CloudFrontClient = boto3.client(
            "cloudfront",
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        self.stubber = Stubber(self.client)
        self.requests: list[dict[str, Any]] = []
        self.client.meta.events.register(
            "provide-client-params.cloudfront.CreateInvalidation", self._record
        )
        self.stubber.activate()

    def _record(self, params: dict[str, Any], **_: Any) -> None:
        self.requests.append(copy.deepcopy(params))

    def succeed(self, times: int = 1) -> None:
        for number in range(times):
            batch = {"Paths": {"Quantity": 0}, "CallerReference": f"answer-{number}"}
            self.stubber.add_response(
                "create_invalidation",
                {
                    "Location": "https://cloudfront.amazonaws.com/invalidation",
                    "Invalidation": {
                        "Id": f"I{number}",
                        "Status": "InProgress",
                        "CreateTime": datetime.datetime(2024, 9, 20, tzinfo=datetime.UTC),
                        "InvalidationBatch": batch,
                    },
                },
            )

    def fail(self, code: str) -> None:
        self.stubber.add_client_error(
            "create_invalidation", service_error_code=code, http_status_code=400
        )

    def batches(self) -> list[list[str]]:
        """The paths of each request, checking each request's declared quantity."""
        paths = []
        for request in self.requests:
            assert request["DistributionId"] == "E2EXAMPLE"
            declared = request["InvalidationBatch"]["Paths"]
            assert declared["Quantity"] == len(declared["Items"])
            paths.append(declared["Items"])
        return paths

    def caller_references(self) -> list[str]:
        return [request["InvalidationBatch"]["CallerReference"] for request in self.requests]


def no_tags(tag: str) -> list[str]:
    return []


def cloudfront_purger(stub: StubbedCloudFront, **options: Any) -> CloudFrontPurger:
    options.setdefault("paths_for_tag", no_tags)
    return CloudFrontPurger("E2EXAMPLE", client=stub.client, backoff=0, **options)


async def test_cloudfront_batches_at_3000_paths() -> None:
    stub = StubbedCloudFront()
    stub.succeed(times=3)
    paths = [f"/products/{number}" for number in range(7001)]

    await cloudfront_purger(stub).purge_paths(paths)

    assert [len(batch) for batch in stub.batches()] == [3000, 3000, 1001]
    assert [path for batch in stub.batches() for path in batch] == paths
    assert len(set(stub.caller_references())) == 3
    stub.stubber.assert_no_pending_responses()


async def test_cloudfront_sends_at_most_15_wildcards_per_batch() -> None:
    stub = StubbedCloudFront()
    stub.succeed(times=3)
    wildcards = [f"/category/{number}/*" for number in range(40)]
    exact = [f"/products/{number}" for number in range(10)]

    await cloudfront_purger(stub).purge_paths(exact + wildcards)

    batches = stub.batches()
    assert [sum(path.endswith("*") for path in batch) for batch in batches] == [15, 15, 10]
    assert sorted(path for batch in batches for path in batch) == sorted(exact + wildcards)


async def test_cloudfront_coalesces_duplicates_and_paths_under_a_wildcard() -> None:
    stub = StubbedCloudFront()
    stub.succeed()
    paths = ["/p/1", "/p/1", "/p/*", "/p/2", "/c/1", "/p/sub/*", "/c/1", "/pp", "/p"]

    await cloudfront_purger(stub).purge_paths(paths)

    assert stub.batches() == [["/p/*", "/c/1", "/pp", "/p"]]


async def test_cloudfront_maps_tags_to_paths() -> None:
    stub = StubbedCloudFront()
    stub.succeed()
    pages = {"product:1": ["/products/1", "/category/7/*"], "category:7": ["/category/7/*"]}

    purger: CdnPurger = cloudfront_purger(stub, paths_for_tag=lambda tag: pages.get(tag, []))
    await purger.purge_tags(["product:1", "category:7", "product:1", "unknown"])

    # Once each, wildcards first.
    assert stub.batches() == [["/category/7/*", "/products/1"]]


async def test_cloudfront_retries_throttling_with_the_same_caller_reference() -> None:
    stub = StubbedCloudFront()
    stub.fail("Throttling")
    stub.fail("TooManyInvalidationsInProgress")
    stub.succeed()
    stub.succeed()

    purger = cloudfront_purger(stub)
    await purger.purge_paths(["/products/1"])
    await purger.purge_paths(["/products/1"])

    references = stub.caller_references()
    assert len(references) == 4
    # Retries of one batch repeat its reference, so CloudFront cannot create it twice;
    # the next purge is a new batch with a new reference.
    assert references[0] == references[1] == references[2] != references[3]
    stub.stubber.assert_no_pending_responses()


async def test_cloudfront_gives_up_after_its_retries_with_a_clear_error() -> None:
    stub = StubbedCloudFront()
    for _ in range(3):
        stub.fail("Throttling")

    with pytest.raises(PurgeError, match=r"failed after 3 attempts: ClientError.*Throttling"):
        await cloudfront_purger(stub, retries=2).purge_paths(["/products/1"])
    stub.stubber.assert_no_pending_responses()


async def test_cloudfront_does_not_retry_a_refusal() -> None:
    stub = StubbedCloudFront()
    stub.fail("AccessDenied")

    with pytest.raises(PurgeError, match="AccessDenied"):
        await cloudfront_purger(stub, retries=5).purge_paths(["/products/1"])
    assert len(stub.requests) == 1


@pytest.mark.parametrize("path", ["products/1", "/a*b", "/with space", '/quote"d', "/ü"])
async def test_invalid_paths_are_rejected_before_any_request(path: str) -> None:
    stub = StubbedCloudFront()

    with pytest.raises(ValueError, match="path"):
        await cloudfront_purger(stub).purge_paths(["/fine", path])
    assert stub.requests == []


class RecordingPurger:
    """Records the calls it gets; optionally fails them."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.tag_calls: list[list[str]] = []
        self.path_calls: list[list[str]] = []
        self.closed = False

    async def purge_tags(self, tags: Sequence[str]) -> None:
        self.tag_calls.append(list(tags))
        if self.error is not None:
            raise self.error

    async def purge_paths(self, paths: Sequence[str]) -> None:
        self.path_calls.append(list(paths))
        if self.error is not None:
            raise self.error

    async def close(self) -> None:
        self.closed = True


async def test_a_burst_inside_one_window_is_one_purge() -> None:
    inner = RecordingPurger()
    purger = CoalescingPurger(inner, window_seconds=3600)

    burst = asyncio.gather(
        *(purger.purge_tags(["product:1", f"category:{n % 3}"]) for n in range(10_000)),
        *(purger.purge_paths(["/products/1"]) for _ in range(100)),
    )
    await asyncio.sleep(0)  # every caller has made its request; the window is still open
    await purger.close()
    await burst

    assert inner.tag_calls == [["product:1", "category:0", "category:1", "category:2"]]
    assert inner.path_calls == [["/products/1"]]
    assert inner.closed


async def test_each_window_is_sent_when_it_ends() -> None:
    inner = RecordingPurger()
    purger = CoalescingPurger(inner, window_seconds=0.01)

    await purger.purge_tags(["product:1"])
    await purger.purge_tags(["product:1"])

    assert inner.tag_calls == [["product:1"], ["product:1"]]


async def test_every_caller_of_a_failed_window_gets_the_error() -> None:
    purger = CoalescingPurger(RecordingPurger(PurgeError("CDN down")), window_seconds=3600)

    callers = asyncio.gather(
        purger.purge_tags(["a"]), purger.purge_tags(["b"]), return_exceptions=True
    )
    await asyncio.sleep(0)
    await purger.close()

    assert [str(outcome) for outcome in await callers] == ["CDN down", "CDN down"]


async def test_a_caller_giving_up_does_not_cancel_the_others_purge() -> None:
    inner = RecordingPurger()
    purger = CoalescingPurger(inner, window_seconds=3600)

    impatient = asyncio.create_task(purger.purge_tags(["a"]))
    patient = asyncio.create_task(purger.purge_tags(["b"]))
    await asyncio.sleep(0)
    impatient.cancel()
    await purger.close()

    await patient
    assert impatient.cancelled()
    assert inner.tag_calls == [["a", "b"]]


async def test_null_purger_as_inner_accepts_every_purge() -> None:
    purger = CoalescingPurger(NullPurger(), window_seconds=0)

    await purger.purge_tags(["product:1"])
    await purger.purge_paths(["/products/*"])
    await purger.close()


async def test_varnish_purger_reports_unreachable_instances_after_its_retries() -> None:
    unreachable = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]

    one = VarnishPurger(unreachable[:1], retries=2, backoff=0)
    with pytest.raises(
        PurgeError, match=r"at http://127\.0\.0\.1:\d+/? failed after 3 attempts: Conn"
    ):
        await one.purge_tags(["product:1"])
    await one.close()

    both = VarnishPurger(unreachable, retries=1, backoff=0)
    with pytest.raises(PurgeError, match=r"^2 of 2 Varnish instances failed: .* after 2 attempts"):
        await both.purge_paths(["/products/1"])
    await both.close()


@pytest.mark.parametrize("tag", ["two words", "a,b", "", "naïve", "x" * 5000])
async def test_varnish_purger_rejects_tags_it_cannot_send(tag: str) -> None:
    # Port 9 (discard) is never contacted: the tag is rejected first.
    purger = VarnishPurger(["http://127.0.0.1:9"], retries=0)

    with pytest.raises(ValueError, match=r"tag|longer than"):
        await purger.purge_tags(["fine", tag])
    await purger.close()
