"""Raw ASGI middleware that renders a route's :class:`CachePolicy` as HTTP caching headers.

It works on the ASGI messages themselves (no ``BaseHTTPMiddleware``, which would run the
route in another task and buffer nothing less than it must): a response is held back only
while one message of it is known to be its whole body (to hash it into an ETag), so a
stream (``StreamingResponse``, ``text/event-stream``, large files) flows through chunk by
chunk as the route produces it.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from freshcache.web.policy import POLICY_STATE_KEY, CachePolicy

__all__ = ["HttpCacheMiddleware", "if_none_match_matches", "strong_etag"]

_CACHEABLE_METHODS = frozenset({"GET", "HEAD"})
# Content headers a 304 leaves out (RFC 9110 15.4.5): it has no content; a cache keeps
# its stored ones.
_NOT_IN_304 = frozenset(
    {b"content-length", b"content-type", b"content-encoding", b"content-language"}
)
_ENTITY_TAG = re.compile(r'(?:W/)?"([^"]*)"')


def strong_etag(body: bytes) -> str:
    """The strong ETag of a response body: a quoted 128-bit BLAKE2b hash."""
    return '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"'


def if_none_match_matches(if_none_match: str, etag: str) -> bool:
    """Whether an ``If-None-Match`` header value matches ``etag``: ``*``, or a list of
    entity tags compared weakly (``W/"x"`` matches ``"x"``), as RFC 9110 requires."""
    if if_none_match.strip() == "*":
        return True
    own = _ENTITY_TAG.fullmatch(etag.strip())
    if own is None:
        return False
    return any(match.group(1) == own.group(1) for match in _ENTITY_TAG.finditer(if_none_match))


def _merge_tokens(existing: list[str], added: tuple[str, ...], separator: str) -> list[str]:
    """Header list items from ``existing`` values then ``added``, without duplicates
    (compared case-insensitively)."""
    merged: dict[str, str] = {}
    for value in existing:
        for item in value.split(separator):
            if item.strip():
                merged.setdefault(item.strip().lower(), item.strip())
    for item in added:
        merged.setdefault(item.lower(), item)
    return list(merged.values())


RawHeaders = list[tuple[bytes, bytes]]


def _values(raw: RawHeaders, name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in raw if key == name]


def _replace(raw: RawHeaders, name: bytes, value: str) -> None:
    raw[:] = [(key, old) for key, old in raw if key != name]
    raw.append((name, value.encode("latin-1")))


def _apply_policy(raw: RawHeaders, policy: CachePolicy) -> None:
    # Works on the raw ASGI header list (names are lower-case bytes): the usual response
    # sets none of these headers itself, so most of this is appending.
    _replace(raw, b"cache-control", policy.cache_control)
    if policy.vary:
        existing = _values(raw, b"vary")
        _replace(raw, b"vary", ", ".join(_merge_tokens(existing, policy.vary, ",")))
    # Surrogate keys are case-sensitive: merged exactly, in both headers (Fastly and
    # most CDNs read Surrogate-Key, Varnish's xkey module reads xkey).
    existing = [*_values(raw, b"surrogate-key"), *_values(raw, b"xkey")]
    keys = dict.fromkeys(key for value in existing for key in value.split())
    keys.update(dict.fromkeys(policy.surrogate_keys))
    if keys:
        joined = " ".join(keys)
        _replace(raw, b"surrogate-key", joined)
        _replace(raw, b"xkey", joined)


class HttpCacheMiddleware:
    """Adds HTTP caching headers to the responses of routes that declared a
    :class:`CachePolicy` (with :func:`set_cache_policy`).

    For a ``GET`` or ``HEAD`` answered with a 2xx status, the policy sets
    ``Cache-Control``, merges its ``vary`` into ``Vary`` and lists its surrogate keys in
    ``Surrogate-Key`` and ``xkey``. A ``200`` whose policy allows caching also gets a strong
    ``ETag`` (with ``etag=True``, a hash of the body; a route's own ``ETag`` is kept
    instead), and a request whose ``If-None-Match`` matches it is answered
    ``304 Not Modified`` without content, keeping the other headers.

    A body is hashed only when it comes in one message matching its ``Content-Length``;
    a stream (no ``Content-Length``, or several messages) gets the headers but no ETag of
    ours and is passed on as it is produced, never buffered. Responses without a policy,
    other methods and non-2xx statuses pass through untouched, so errors are not cached.
    Add this middleware outside any compression middleware, so that the ETag identifies
    the bytes actually sent.
    """

    def __init__(self, app: ASGIApp, *, etag: bool = True) -> None:
        self.app = app
        self.etag = etag

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _CACHEABLE_METHODS:
            await self.app(scope, receive, send)
            return
        # Created here, so that the route's request.state and this middleware share one
        # dict even if something between them copies the scope.
        state: dict[str, Any] = scope.setdefault("state", {})
        if_none_match = ", ".join(_values(scope["headers"], b"if-none-match")) or None
        response = _CachedResponse(send, state, if_none_match, hash_body=self.etag)
        await self.app(scope, receive, response.send)


class _CachedResponse:
    """The ``send`` of one response: adds the headers, holds the start for one body
    message when it may hash it, and drops the content of a 304."""

    def __init__(
        self, send: Send, state: dict[str, Any], if_none_match: str | None, *, hash_body: bool
    ) -> None:
        self._send = send
        self._state = state
        self._if_none_match = if_none_match
        self._hash_body = hash_body
        self._held_start: Message | None = None
        self._not_modified = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            await self._start(message)
        elif self._not_modified:
            return  # the route's content of a response already answered 304
        elif self._held_start is not None:
            start, self._held_start = self._held_start, None
            await self._finish_held(start, message)
        else:
            await self._send(message)

    async def _start(self, message: Message) -> None:
        policy = self._state.get(POLICY_STATE_KEY)
        if not isinstance(policy, CachePolicy) or not 200 <= message["status"] < 300:
            await self._send(message)
            return
        # A copy: the route's response object may reuse its header list.
        raw: RawHeaders = list(message.get("headers", []))
        message = {**message, "headers": raw}
        _apply_policy(raw, policy)
        etag = _values(raw, b"etag")
        if policy.no_store or message["status"] != 200:
            await self._send(message)
        elif etag:
            await self._send_validated(message, etag[0])
        elif self._hash_body and _values(raw, b"content-length"):
            self._held_start = message
        else:
            await self._send(message)

    async def _finish_held(self, start: Message, message: Message) -> None:
        raw: RawHeaders = start["headers"]
        body: bytes = message.get("body", b"")
        whole_body = (
            message["type"] == "http.response.body"
            and not message.get("more_body", False)
            and [str(len(body))] == _values(raw, b"content-length")
        )
        if not whole_body:
            # A stream, or a body left out (a HEAD answered by headers only): no hash.
            await self._send(start)
            await self._send(message)
            return
        etag = strong_etag(body)
        _replace(raw, b"etag", etag)
        await self._send_validated(start, etag, message)

    async def _send_validated(
        self, start: Message, etag: str, body_message: Message | None = None
    ) -> None:
        """Send ``start`` (and the body message already received, if any), or a 304 if
        the request's ``If-None-Match`` matches ``etag``."""
        if self._if_none_match is None or not if_none_match_matches(self._if_none_match, etag):
            await self._send(start)
            if body_message is not None:
                await self._send(body_message)
            return
        start["headers"] = [
            (key, value) for key, value in start["headers"] if key not in _NOT_IN_304
        ]
        self._not_modified = True
        await self._send({**start, "status": 304})
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})
