"""Realistic traffic against a running marketplace service (``freshcache loadgen``).

The generator first discovers what it can read: the category tree, then every product of
every tenant (one API key per tenant) through the listing pages (50 at most per tenant
and category); it creates a few users per tenant, to read their profiles. Then it sends
a mix of requests from ``concurrency`` workers over keep-alive connections:

- reads: a product (Zipf over all products: a few are popular, most are not), a listing
  page (Zipf over the pages), the marketplace search (Zipf over a vocabulary made of the
  products' names, sometimes near a point), nearby shops (Zipf over points around
  ``around``), the category tree, a user's profile, the dashboard;
- writes, a ``write_ratio`` share of all requests: product edits (price, sometimes the
  name), stock changes, orders (``409`` out of stock is an answer, not an error) and,
  with the admin token, category renames.

Whether a read was served from the cache comes from the service's ``X-Cache`` header
(``miss``: loaded from the database); latencies are split on it. Every request counts:
an unexpected status or a transport error is an error. The generator writes: point it at
a deployment whose data may change.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

__all__ = ["Call", "EndpointStats", "LoadConfig", "LoadReport", "LoadgenError", "Zipf", "run_load"]

T = TypeVar("T")

_MAX_PAGES = 50  # per tenant and category, while discovering
_VOCABULARY = 200
_POINTS = 40
_EDIT_SUFFIX = re.compile(r" v\d+$")
_READS: tuple[tuple[str, float], ...] = (
    ("product", 0.45),
    ("page", 0.15),
    ("search", 0.15),
    ("nearby", 0.07),
    ("categories", 0.06),
    ("profile", 0.06),
    ("dashboard", 0.06),
)
# Orders and stock changes come far more often than merchants edit their catalogue.
_WRITES: tuple[tuple[str, float], ...] = (("order", 0.5), ("stock", 0.35), ("edit", 0.15))
_ADMIN_WRITES: tuple[tuple[str, float], ...] = (("category", 0.02),)


class LoadgenError(Exception):
    """The service cannot be driven: unreachable, a token refused, nothing to read."""


@dataclass(frozen=True)
class LoadConfig:
    """What to send, and how much.

    ``tokens`` are tenants' API keys (one per tenant); ``admin_token`` adds category
    renames to the writes. The measured run is ``requests`` requests, or ``duration``
    seconds when given; ``warmup`` requests of the same mix go first, not counted.
    ``zipf_exponent`` sets how skewed popularity is (1.0: the classic web workload).
    ``users_per_tenant`` users are created per tenant, for profile reads. ``around`` is
    the point nearby-shop and located searches are drawn around. A request taking longer
    than ``timeout`` seconds counts as an error.
    """

    url: str
    tokens: tuple[str, ...]
    admin_token: str | None = None
    requests: int = 10_000
    duration: float | None = None
    warmup: int = 0
    concurrency: int = 32
    write_ratio: float = 0.02
    seed: int = 0
    zipf_exponent: float = 1.0
    users_per_tenant: int = 3
    around: tuple[float, float] = (52.52, 13.40)
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if not self.tokens:
            raise ValueError("give at least one tenant API key")
        if not 0 <= self.write_ratio <= 1:
            raise ValueError("write_ratio must be between 0 and 1")
        if self.concurrency < 1 or self.requests < 1 or self.warmup < 0:
            raise ValueError("concurrency and requests must be >= 1, warmup >= 0")
        if self.duration is not None and self.duration <= 0:
            raise ValueError("duration must be > 0")


class Zipf:
    """Ranks ``0 .. n-1`` drawn with probability proportional to ``1 / (rank + 1) ** s``."""

    def __init__(self, n: int, exponent: float, rng: random.Random) -> None:
        if n < 1:
            raise ValueError("a Zipf distribution needs at least one rank")
        self._cumulative = list(itertools.accumulate(1 / (k**exponent) for k in range(1, n + 1)))
        self._rng = rng

    def rank(self) -> int:
        """One draw."""
        point = self._rng.random() * self._cumulative[-1]
        return min(bisect.bisect_right(self._cumulative, point), len(self._cumulative) - 1)


@dataclass(frozen=True, slots=True)
class Call:
    """One request of the mix; ``accepted`` are the statuses that are not errors."""

    endpoint: str
    method: str
    path: str
    token: str | None = None
    body: dict[str, Any] | None = None
    params: dict[str, str] | None = None
    accepted: tuple[int, ...] = (200,)


@dataclass(frozen=True, slots=True)
class _Product:
    token: str
    id: str
    name: str


@dataclass
class _Catalog:
    """What discovery found."""

    products: list[_Product]
    pages: list[tuple[str, str, int]]  # token, category, page
    categories: list[tuple[str, str]]  # id, name
    users: list[tuple[str, str]]  # token, user id
    vocabulary: list[str]


@dataclass
class EndpointStats:
    """What one endpoint of the mix got: counts, cache results, latencies (seconds)."""

    requests: int = 0
    errors: int = 0
    hits: int = 0
    misses: int = 0
    cached: list[float] = field(default_factory=list)
    uncached: list[float] = field(default_factory=list)

    @property
    def hit_ratio(self) -> float | None:
        """Hits over the responses that carried ``X-Cache``; None if none did."""
        answered = self.hits + self.misses
        return self.hits / answered if answered else None


def _percentile_ms(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(share * len(ordered)) - 1)] * 1000, 3)


def _cell(column: str, value: float | None) -> str:
    if value is None:
        return ""
    if column == "hit_ratio":
        return f"{value:.3f}"
    return f"{value:.2f}" if "_ms_" in column else f"{value:,}"


def _figures_of(stats: EndpointStats) -> dict[str, Any]:
    ratio = stats.hit_ratio
    latencies = {"cached": stats.cached, "uncached": stats.uncached}
    return {
        "requests": stats.requests,
        "errors": stats.errors,
        "hit_ratio": None if ratio is None else round(ratio, 4),
        **{
            f"p{share}_ms_{kind}": _percentile_ms(latencies[kind], share / 100)
            for kind in latencies
            for share in (50, 99)
        },
    }


_COLUMNS = tuple(_figures_of(EndpointStats()))


@dataclass
class LoadReport:
    """The measured run: per endpoint, and the first few error messages."""

    endpoints: dict[str, EndpointStats] = field(default_factory=dict)
    seconds: float = 0.0
    error_samples: list[str] = field(default_factory=list)

    def record(self, call: Call, seconds: float, response: httpx.Response | str) -> None:
        """Count one request: its response, or the transport error that replaced it."""
        stats = self.endpoints.setdefault(call.endpoint, EndpointStats())
        stats.requests += 1
        if isinstance(response, str) or response.status_code not in call.accepted:
            stats.errors += 1
            if len(self.error_samples) < 10:
                detail = response if isinstance(response, str) else response.text[:120]
                status = "" if isinstance(response, str) else f"{response.status_code} "
                self.error_samples.append(f"{call.method} {call.path}: {status}{detail}")
            return
        result = response.headers.get("x-cache")
        if result == "miss":
            stats.misses += 1
            stats.uncached.append(seconds)
        elif result is not None:
            stats.hits += 1
            stats.cached.append(seconds)

    @property
    def total(self) -> EndpointStats:
        """Every endpoint's figures together."""
        total = EndpointStats()
        for stats in self.endpoints.values():
            total.requests += stats.requests
            total.errors += stats.errors
            total.hits += stats.hits
            total.misses += stats.misses
            total.cached += stats.cached
            total.uncached += stats.uncached
        return total

    def figures(self) -> dict[str, Any]:
        """The figures as plain data (JSON-ready): totals, then per endpoint."""
        total = self.total
        return {
            **_figures_of(total),
            "seconds": round(self.seconds, 3),
            "requests_per_second": round(total.requests / max(self.seconds, 1e-9), 1),
            "endpoints": {name: _figures_of(stats) for name, stats in self.endpoints.items()},
        }

    def table(self) -> Table:
        """The figures as a table (milliseconds; cached = ``X-Cache`` other than miss)."""
        figures = self.figures()
        table = Table(
            title=f"{figures['requests']:,} requests in {self.seconds:.1f} s "
            f"({figures['requests_per_second']:,.0f}/s)"
        )
        table.add_column("endpoint")
        for column in _COLUMNS:
            table.add_column(column.replace("_ms_", " ").replace("_", " "), justify="right")
        rows = [*sorted(figures["endpoints"].items()), ("all", figures)]
        for index, (name, row) in enumerate(rows):
            table.add_row(
                name,
                *(_cell(column, row[column]) for column in _COLUMNS),
                end_section=index == len(rows) - 2,
            )
        return table


# -- discovery ---------------------------------------------------------------------------


async def _together(coroutines: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Their results; the first failure cancels the others and is raised as it is."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(coroutine) for coroutine in coroutines]
    except ExceptionGroup as failures:
        raise failures.exceptions[0] from None
    return [task.result() for task in tasks]


def _auth(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


async def _get_json(client: httpx.AsyncClient, path: str, token: str | None = None) -> Any:
    try:
        response = await client.get(path, headers=_auth(token))
    except httpx.HTTPError as error:
        raise LoadgenError(f"GET {path}: {type(error).__name__}: {error}") from None
    if response.status_code != 200:
        raise LoadgenError(f"GET {path}: {response.status_code} {response.text[:200]}")
    return response.json()


def _flatten(nodes: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    found = []
    for node in nodes:
        found.append((node["id"], node["name"]))
        found += _flatten(node.get("children", ()))
    return found


async def _discover(
    client: httpx.AsyncClient, config: LoadConfig, limit: asyncio.Semaphore
) -> _Catalog:
    tree = await _get_json(client, "/api/categories")
    categories = _flatten(tree["categories"])
    products: list[_Product] = []
    pages: list[tuple[str, str, int]] = []

    async def walk(token: str, category: str) -> None:
        for page in range(1, _MAX_PAGES + 1):
            async with limit:
                listing = await _get_json(
                    client, f"/api/products?category={category}&page={page}", token
                )
            pages.append((token, category, page))
            products.extend(_Product(token, item["id"], item["name"]) for item in listing["items"])
            if not listing["has_more"]:
                return

    await _together(walk(token, category) for token in config.tokens for category, _ in categories)
    if not products:
        raise LoadgenError("no products found with these tokens: nothing to read")
    # Discovery order is the database's; popularity must not follow it.
    rng = random.Random(config.seed)
    products.sort(key=lambda product: product.id)
    rng.shuffle(products)
    pages.sort()
    rng.shuffle(pages)
    users = await _create_users(client, config, limit)
    words = Counter(
        word for product in products for word in re.findall(r"[a-z0-9]{3,}", product.name.lower())
    )
    vocabulary = [word for word, _ in sorted(words.items(), key=lambda item: (-item[1], item[0]))]
    return _Catalog(products, pages, categories, users, vocabulary[:_VOCABULARY])


async def _create_users(
    client: httpx.AsyncClient, config: LoadConfig, limit: asyncio.Semaphore
) -> list[tuple[str, str]]:
    async def create(token: str, number: int) -> tuple[str, str]:
        body = {"name": f"Load user {number}", "email": f"load{number}@loadgen.example"}
        async with limit:
            response = await client.post("/api/users", json=body, headers=_auth(token))
        if response.status_code != 201:
            raise LoadgenError(f"POST /api/users: {response.status_code} {response.text[:200]}")
        return token, str(response.json()["id"])

    count = config.users_per_tenant
    return await _together(create(token, n) for token in config.tokens for n in range(count))


# -- the mix -----------------------------------------------------------------------------


class _Mix:
    """Draws the next request of the mix (each kind is made by the method ``_<kind>``)."""

    def __init__(self, catalog: _Catalog, config: LoadConfig) -> None:
        self.catalog = catalog
        self.config = config
        self.rng = rng = random.Random(config.seed + 1)
        self.products = Zipf(len(catalog.products), config.zipf_exponent, rng)
        self.pages = Zipf(len(catalog.pages), config.zipf_exponent, rng)
        self.words = Zipf(max(1, len(catalog.vocabulary)), config.zipf_exponent, rng)
        lat, lng = config.around
        self.points = [
            (round(lat + rng.uniform(-0.2, 0.2), 2), round(lng + rng.uniform(-0.3, 0.3), 2))
            for _ in range(_POINTS)
        ]
        self.popular_points = Zipf(_POINTS, config.zipf_exponent, rng)
        self.edits = itertools.count(1)
        possible = {"profile": bool(catalog.users), "search": bool(catalog.vocabulary)}
        reads = [(kind, weight) for kind, weight in _READS if possible.get(kind, True)]
        writes = [*_WRITES, *(_ADMIN_WRITES if config.admin_token else ())]
        self.read_kinds, self.read_weights = zip(*reads, strict=True)
        self.write_kinds, self.write_weights = zip(*writes, strict=True)

    def next_call(self) -> Call:
        if self.rng.random() < self.config.write_ratio:
            kind = self.rng.choices(self.write_kinds, self.write_weights)[0]
        else:
            kind = self.rng.choices(self.read_kinds, self.read_weights)[0]
        make: Callable[[], Call] = getattr(self, f"_{kind}")
        return make()

    def _popular_product(self) -> _Product:
        return self.catalog.products[self.products.rank()]

    def _point(self) -> tuple[float, float]:
        return self.points[self.popular_points.rank()]

    def _product(self) -> Call:
        product = self._popular_product()
        return Call("GET /api/products/{id}", "GET", f"/api/products/{product.id}", product.token)

    def _page(self) -> Call:
        token, category, page = self.catalog.pages[self.pages.rank()]
        params = {"category": category, "page": str(page)}
        return Call("GET /api/products?category&page", "GET", "/api/products", token, params=params)

    def _search(self) -> Call:
        params = {"q": self.catalog.vocabulary[self.words.rank()]}
        if self.rng.random() < 0.2:
            params["location"] = "{},{}".format(*self._point())
        return Call("GET /api/marketplace/search", "GET", "/api/marketplace/search", params=params)

    def _nearby(self) -> Call:
        lat, lng = self._point()
        params = {"lat": str(lat), "lng": str(lng), "radius": self.rng.choice(("2", "5", "10"))}
        path = "/api/marketplace/shops/nearby"
        return Call(f"GET {path}", "GET", path, params=params)

    def _categories(self) -> Call:
        return Call("GET /api/categories", "GET", "/api/categories")

    def _profile(self) -> Call:
        token, user = self.rng.choice(self.catalog.users)
        return Call("GET /api/users/{id}/profile", "GET", f"/api/users/{user}/profile", token)

    def _dashboard(self) -> Call:
        return Call(
            "GET /api/dashboard", "GET", "/api/dashboard", self.rng.choice(self.config.tokens)
        )

    def _edit(self) -> Call:
        # Merchants edit their whole catalogue, not only what shoppers look at.
        product = self.rng.choice(self.catalog.products)
        body: dict[str, Any] = {"price": round(self.rng.uniform(1, 500), 2)}
        if self.rng.random() < 0.2:
            body["name"] = f"{_EDIT_SUFFIX.sub('', product.name)[:190]} v{next(self.edits)}"
        path = f"/api/products/{product.id}"
        return Call("PATCH /api/products/{id}", "PATCH", path, product.token, body)

    def _stock(self) -> Call:
        product = self.rng.choice(self.catalog.products)
        body = {"stock": self.rng.randint(20, 200)}
        path = f"/api/products/{product.id}/stock"
        return Call("PUT /api/products/{id}/stock", "PUT", path, product.token, body)

    def _order(self) -> Call:
        product = self._popular_product()
        body = {"items": [{"product_id": product.id, "quantity": 1}]}
        return Call(
            "POST /api/orders", "POST", "/api/orders", product.token, body, accepted=(201, 409)
        )

    def _category(self) -> Call:
        category, name = self.rng.choice(self.catalog.categories)
        body = {"name": f"{_EDIT_SUFFIX.sub('', name)[:190]} v{next(self.edits)}"}
        path = f"/api/categories/{category}"
        return Call("PATCH /api/categories/{id}", "PATCH", path, self.config.admin_token, body)


# -- the run -----------------------------------------------------------------------------


async def _send(client: httpx.AsyncClient, call: Call, report: LoadReport | None) -> None:
    started = time.perf_counter()
    response: httpx.Response | str
    try:
        response = await client.request(
            call.method, call.path, params=call.params, json=call.body, headers=_auth(call.token)
        )
    except httpx.HTTPError as error:
        response = f"{type(error).__name__}: {error}"
    if report is not None:
        report.record(call, time.perf_counter() - started, response)


async def _phase(
    client: httpx.AsyncClient,
    mix: _Mix,
    config: LoadConfig,
    budget: int | None,
    deadline: float | None,
    report: LoadReport | None,
    advance: Callable[[], None],
) -> None:
    """``concurrency`` workers sending the mix until ``budget`` requests were sent or
    ``deadline`` (monotonic) passed."""
    sent = itertools.count()

    async def worker() -> None:
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                return
            if budget is not None and next(sent) >= budget:
                return
            await _send(client, mix.next_call(), report)
            advance()

    await _together(worker() for _ in range(config.concurrency))


async def run_load(config: LoadConfig, *, progress: Console | None = None) -> LoadReport:
    """Discover, warm up, then send the measured mix; the report of the measured part.

    With ``progress``, a progress bar is shown on that console while the mix runs.
    """
    limits = httpx.Limits(
        max_connections=config.concurrency, max_keepalive_connections=config.concurrency
    )
    async with httpx.AsyncClient(
        base_url=config.url, limits=limits, timeout=config.timeout
    ) as client:
        catalog = await _discover(client, config, asyncio.Semaphore(config.concurrency))
        mix = _Mix(catalog, config)
        report = LoadReport()
        with Progress(console=progress, transient=True, disable=progress is None) as bar:
            if config.warmup:
                warming = bar.add_task("warm-up", total=config.warmup)
                await _phase(
                    client, mix, config, config.warmup, None, None, lambda: bar.advance(warming)
                )
                bar.remove_task(warming)
            started = time.monotonic()
            deadline = None if config.duration is None else started + config.duration
            total = config.requests if config.duration is None else config.duration
            task = bar.add_task("requests" if config.duration is None else "seconds", total=total)

            def advance() -> None:
                if deadline is None:
                    bar.advance(task)
                else:
                    bar.update(task, completed=min(time.monotonic() - started, total))

            budget = config.requests if deadline is None else None
            await _phase(client, mix, config, budget, deadline, report, advance)
            report.seconds = time.monotonic() - started
    return report
