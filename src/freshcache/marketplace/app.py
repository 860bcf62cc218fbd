"""The application factory: ``create_app(settings)`` builds the ASGI app; its lifespan
starts the instance's runtime (database, cache, bus, relay, worker) and stops it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from freshcache.marketplace.auth import TenantDirectory
from freshcache.marketplace.caching import CacheResultHeaderMiddleware
from freshcache.marketplace.demo import DemoTenant, ensure_demo
from freshcache.marketplace.errors import install_error_handlers
from freshcache.marketplace.metrics import Metrics, MetricsMiddleware
from freshcache.marketplace.routes import catalog, marketplace, ops, orders, products, reports
from freshcache.marketplace.routes import tenants as tenant_routes
from freshcache.marketplace.runtime import Runtime
from freshcache.marketplace.settings import Settings
from freshcache.web import HttpCacheMiddleware

__all__ = ["ReadyCallback", "create_app"]

ReadyCallback = Callable[[Runtime, list[DemoTenant]], None]
"""Called once the instance is ready to serve, with the demo tenants (if any)."""


def create_app(settings: Settings, *, on_ready: ReadyCallback | None = None) -> FastAPI:
    """The marketplace service as an ASGI app; nothing starts until its lifespan does."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(settings)
        await runtime.start()
        try:
            app.state.runtime = runtime
            app.state.tenant_directory = TenantDirectory(runtime)
            metrics.attach(runtime)
            demo = await ensure_demo(runtime) if settings.demo else []
            if on_ready is not None:
                on_ready(runtime, demo)
            yield
        finally:
            metrics.detach()
            await runtime.stop()

    app = FastAPI(
        title="freshcache marketplace",
        summary="The specification's multi-tenant marketplace, with fresh caches.",
        lifespan=lifespan,
        # An id like "..%2F" must be a 404 here, not a redirect to another path.
        redirect_slashes=False,
    )
    app.state.metrics = metrics
    install_error_handlers(app)
    for module in (tenant_routes, products, catalog, marketplace, orders, reports, ops):
        app.include_router(module.router)
    # Added last is outermost: the latency measured includes the caching headers' work.
    app.add_middleware(CacheResultHeaderMiddleware)
    app.add_middleware(HttpCacheMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
