"""A small origin server for tests that put Varnish in front of an application.

Run as ``python origin.py PORT``; it serves on 127.0.0.1:PORT until terminated. It runs in
its own process, so the cache under test reaches it over a real socket like any backend.

Every path answers ``200`` with the body ``<path> #<n> <accept-language>``, where ``n``
counts the requests that reached the origin for that path (query string excluded). The
query string chooses the response headers:

- ``cc``: ``Cache-Control`` (default ``public, max-age=300, stale-while-revalidate=60``);
- ``xkey``, ``sk``: ``xkey`` and ``Surrogate-Key`` (space-separated tags);
- ``vary``: ``Vary``.

``GET /__hits`` answers a JSON object mapping each path to its request count.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

DEFAULT_CACHE_CONTROL = "public, max-age=300, stale-while-revalidate=60"

hits: Counter[str] = Counter()
hits_lock = threading.Lock()


class OriginHandler(BaseHTTPRequestHandler):
    """Answers every GET as described in the module docstring."""

    # Keep-alive, as Varnish reuses its backend connections.
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/__hits":
            with hits_lock:
                snapshot = dict(hits)
            self._answer(json.dumps(snapshot).encode(), {"Content-Type": "application/json"})
            return
        with hits_lock:
            hits[url.path] += 1
            count = hits[url.path]
        query = {name: values[-1] for name, values in parse_qs(url.query).items()}
        headers = {"Content-Type": "text/plain", "Cache-Control": DEFAULT_CACHE_CONTROL}
        for parameter, header in (
            ("cc", "Cache-Control"),
            ("xkey", "xkey"),
            ("sk", "Surrogate-Key"),
            ("vary", "Vary"),
        ):
            if parameter in query:
                headers[header] = query[parameter]
        language = self.headers.get("Accept-Language", "")
        self._answer(f"{url.path} #{count} {language}".encode(), headers)

    def _answer(self, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(200)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Stay quiet: the tests read the counters, not a log."""


def main() -> None:
    """Serve on 127.0.0.1 at the port given as the only argument."""
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), OriginHandler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
