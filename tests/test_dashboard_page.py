"""The dashboard page at ``/dashboard`` in headless Chromium (Debian's, driven by
Playwright): a tenant's page shows its pre-computed figures and, live, a stock change
and an order made through the API; the operator's page charts the hit ratio per endpoint
and lists the alerts. Screenshots of both go to the test's temporary folder (their paths
are printed)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from fastapi import FastAPI
from playwright.async_api import Browser, Page, async_playwright, expect

from freshcache.marketplace import Settings, create_app
from freshcache.marketplace.analytics import DashboardAnalytics
from freshcache.testing import serve_app
from service_cases import ADMIN, ADMIN_TOKEN, settings_for

OVERVIEW = "/api/monitoring/overview"

# No sandbox (tests may run as root), and nothing that would reach the network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


@dataclass
class Served:
    url: str
    app: FastAPI


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[Served]:
    """The service under uvicorn, in this event loop."""
    app = create_app(settings)
    async with serve_app(app) as url:
        yield Served(url, app)


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    executable = shutil.which("chromium")
    assert executable, "chromium is missing: apt-get install chromium"
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class Shop:
    """A tenant with products and two orders, through the API."""

    headers: dict[str, str]
    api_key: str
    tenant_id: str
    products: dict[str, str]  # name -> id


async def open_shop(client: httpx.AsyncClient) -> Shop:
    created = (
        await client.post("/api/tenants", json={"name": "Alpine Gear"}, headers=ADMIN)
    ).json()
    headers = {"Authorization": f"Bearer {created['api_key']}"}
    category = (
        await client.post("/api/categories", json={"name": "Camping"}, headers=ADMIN)
    ).json()
    products = {}
    for name, price, stock in (
        ("Trail tent", 199, 20),
        ("Headlamp", 35, 12),
        ("Camp stove", 59, 30),
    ):
        body = {"name": name, "price": price, "category_id": category["id"]}
        product = (await client.post("/api/products", json=body, headers=headers)).json()
        await client.put(
            f"/api/products/{product['id']}/stock", json={"stock": stock}, headers=headers
        )
        products[name] = product["id"]
    for name, quantity in (("Trail tent", 2), ("Headlamp", 3)):
        order = {"items": [{"product_id": products[name], "quantity": quantity}]}
        assert (await client.post("/api/orders", json=order, headers=headers)).status_code == 201
    return Shop(headers, created["api_key"], created["id"], products)


async def sign_in(browser: Browser, url: str, token: str) -> tuple[Page, list[str]]:
    page = await browser.new_page(viewport={"width": 1360, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(url + "/dashboard")
    await page.fill("#token", token)
    await page.click("#login-form button[type=submit]")
    await expect(page.locator("#status")).to_have_attribute("data-state", "live")
    return page, errors


async def test_a_tenant_sees_its_figures_and_a_stock_change_within_two_seconds(
    tmp_path: Path,
) -> None:
    settings = settings_for(tmp_path / "data", monitor_interval=0.5)
    async with (
        serving(settings) as served,
        httpx.AsyncClient(base_url=served.url, timeout=10) as client,
        chromium() as browser,
    ):
        shop = await open_shop(client)
        analytics: DashboardAnalytics = served.app.state.analytics
        await analytics.refresh([shop.tenant_id])
        page, errors = await sign_in(browser, served.url, shop.api_key)
        await expect(page.locator("#kpi-orders")).to_have_text("2")
        await expect(page.locator("#kpi-revenue")).to_contain_text("503")
        await expect(page.locator("#chart-revenue rect.bar.now")).to_have_count(1)
        await expect(page.locator("#chart-top text", has_text="Headlamp")).to_have_count(1)

        stove = shop.products["Camp stove"]
        alert = page.locator(f'#stock-alerts li[data-product-id="{stove}"]')
        changed = time.monotonic()
        stock = await client.put(
            f"/api/products/{stove}/stock", json={"stock": 2}, headers=shop.headers
        )
        assert stock.status_code == 200
        await expect(alert.locator(".pill")).to_have_text("2 left", timeout=2000)
        print(f"\nstock change on the page after {time.monotonic() - changed:.2f} s")
        await expect(alert.locator(".name")).to_have_text("Camp stove")
        await expect(page.locator("#kpi-low")).to_have_text("1")

        order = {"items": [{"product_id": stove, "quantity": 1}]}
        assert (
            await client.post("/api/orders", json=order, headers=shop.headers)
        ).status_code == 201
        await expect(page.locator("#kpi-orders")).to_have_text("3")
        await expect(page.locator("#kpi-orders-live")).to_contain_text("+1 live")
        await expect(page.locator("#order-feed li .amount")).to_have_count(1)
        screenshot = tmp_path / "dashboard-tenant.png"
        await page.screenshot(path=screenshot, full_page=True)
        print(f"tenant dashboard: {screenshot}")
        assert errors == []


async def test_an_operator_sees_hit_ratios_per_endpoint_and_the_alerts(tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "data", monitor_interval=0.4)
    async with (
        serving(settings) as served,
        httpx.AsyncClient(base_url=served.url, timeout=10) as client,
        chromium() as browser,
    ):
        shop = await open_shop(client)

        async def browse() -> None:
            names = list(shop.products.items())
            for round_number in range(10_000):
                name, product = names[round_number % len(names)]
                await client.get(f"/api/products/{product}", headers=shop.headers)
                await client.get("/api/marketplace/search", params={"q": name.split()[0]})
                await asyncio.sleep(0.02)

        traffic = asyncio.create_task(browse())
        try:
            page, errors = await sign_in(browser, served.url, ADMIN_TOKEN)
            await expect(page.locator("#operator-view")).to_be_visible()
            # A line per endpoint, once two intervals have reads.
            await expect(page.locator("#chart-hit svg path")).not_to_have_count(0)
            await expect(
                page.locator("#legend-hit span span", has_text="/api/products/{product_id}")
            ).to_have_count(1)
            endpoint_row = page.locator(
                '#endpoint-table tr[data-endpoint="/api/products/{product_id}"]'
            )
            await expect(endpoint_row).to_have_count(1)
            await expect(page.locator("#alert-list li.empty.ok")).to_have_count(1)
            await expect(page.locator("#kpi-hit")).to_contain_text("%")
            await expect(page.locator("#chart-latency svg path")).not_to_have_count(0)
            async with asyncio.timeout(20):  # a few more points, for the screenshot
                while True:
                    overview = (await client.get(OVERVIEW, headers=ADMIN)).json()
                    if len(overview["points"]) >= 12:
                        break
                    await asyncio.sleep(0.1)
            # The page's own stream is an open SSE connection.
            await expect(page.locator("#kpi-connections-note")).to_contain_text("sse 1")
        finally:
            traffic.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await traffic
        screenshot = tmp_path / "dashboard-operator.png"
        await page.screenshot(path=screenshot, full_page=True)
        print(f"\noperator dashboard: {screenshot}")
        assert errors == []
