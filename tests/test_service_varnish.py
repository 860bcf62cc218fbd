"""The marketplace service behind a real Varnish with the shipped VCL: public reads are
served from Varnish, and a change made through the service purges exactly them (the
service purges by surrogate key with each invalidation)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from freshcache.testing import VarnishServer, free_port

ADMIN_TOKEN = "admin-token-for-the-varnish-test"


@pytest.fixture
def service_behind_varnish(tmp_path: Path) -> Iterator[tuple[str, str, list[str]]]:
    """(Varnish URL, service URL, demo tenant tokens)."""
    port = free_port()
    with VarnishServer(backend_port=port) as varnish:
        environment = {
            **os.environ,
            "FRESHCACHE_DATA_DIR": str(tmp_path / "data"),
            "FRESHCACHE_ADMIN_TOKEN": ADMIN_TOKEN,
            "FRESHCACHE_VARNISH_URLS": varnish.url,
        }
        environment.pop("FRESHCACHE_DATABASE_URL", None)
        environment.pop("FRESHCACHE_REDIS_URL", None)
        command = [str(Path(sys.executable).parent / "freshcache"), "serve", "--port", str(port)]
        server = subprocess.Popen(
            command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            assert server.stdout is not None
            output = ""
            deadline = time.monotonic() + 60
            while "Application startup complete" not in output:
                assert time.monotonic() < deadline and server.poll() is None, output
                output += server.stdout.readline()
            tokens = re.findall(r"^    [^:]+: (fc_\S+)$", output, re.MULTILINE)
            yield varnish.url, f"http://127.0.0.1:{port}", tokens
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.communicate()


def test_public_reads_come_from_varnish_until_a_change_purges_them(
    service_behind_varnish: tuple[str, str, list[str]],
) -> None:
    varnish, service, tokens = service_behind_varnish
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    tenant = {"Authorization": f"Bearer {tokens[0]}"}
    with httpx.Client(timeout=10) as http:
        first = http.get(f"{varnish}/api/categories")
        again = http.get(f"{varnish}/api/categories")
        assert (first.headers["x-cache"], again.headers["x-cache"]) == ("MISS", "HIT")
        search = http.get(f"{varnish}/api/marketplace/search", params={"q": "tent"})
        assert (
            http.get(f"{varnish}/api/marketplace/search", params={"q": "tent"}).headers["x-cache"]
            == "HIT"
        )
        assert "xkey" not in again.headers and "surrogate-key" not in again.headers

        tents = next(
            category
            for root in first.json()["categories"]
            for category in root["children"]
            if category["name"] == "Tents"
        )
        renamed = http.patch(
            f"{service}/api/categories/{tents['id']}",
            json={"name": "Tents & shelters"},
            headers=admin,
        )
        assert renamed.status_code == 200
        after = http.get(f"{varnish}/api/categories")
        assert after.headers["x-cache"] == "MISS"
        assert "Tents & shelters" in after.text

        product = search.json()["results"][0]
        edited = http.patch(
            f"{service}/api/products/{product['id']}",
            json={"name": "Storm tent 2P"},
            headers=tenant,
        )
        assert edited.status_code == 200, edited.text
        fresh = http.get(f"{varnish}/api/marketplace/search", params={"q": "tent"})
        assert fresh.headers["x-cache"] == "MISS"
        assert "Storm tent 2P" in fresh.text
