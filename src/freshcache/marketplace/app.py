"""The application factory: ``create_app(settings)`` builds the ASGI app; its lifespan
starts the instance's runtime (database, cache, bus, relay, worker) and real-time layer,
and stops them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from freshcache.marketplace import dashboard_page
from freshcache.marketplace.analytics import DashboardAnalytics, interval_lock
from freshcache.marketplace.auth import TenantDirectory
from freshcache.marketplace.caching import CacheResultHeaderMiddleware
from freshcache.marketplace.demo import DemoTenant, ensure_demo
from freshcache.marketplace.errors import install_error_handlers
from freshcache.marketplace.live import LiveSettings, LiveUpdates
from freshcache.marketplace.metrics import Metrics, MetricsMiddleware
from freshcache.marketplace.monitoring import Monitor
from freshcache.marketplace.routes import catalog, marketplace, ops, orders, products, reports
from freshcache.marketplace.routes import monitoring as monitoring_routes
from freshcache.marketplace.routes import tenants as tenant_routes
from freshcache.marketplace.runtime import Runtime
from freshcache.marketplace.settings import Settings
from freshcache.web import HttpCacheMiddleware

__all__ = ["ReadyCallback", "create_app"]

ReadyCallback = Callable[[Runtime, list[DemoTenant]], None]
"""Called once the instance is ready to serve, with the demo tenants (if any)."""


def create_app(
    settings: Settings, *, on_ready: ReadyCallback | None = None, live: LiveSettings | None = None
) -> FastAPI:
    """The marketplace service as an ASGI app; nothing starts until its lifespan does.

    ``live``: the real-time layer's settings (by default from ``FRESHCACHE_LIVE_*``).
    """
    metrics = Metrics()
    live_updates = LiveUpdates(settings, live or LiveSettings.from_env())
    monitor = Monitor(
        metrics,
        settings.monitor_interval,
        admin_token=settings.admin_token,
        realtime=live_updates.realtime,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(
            settings, listeners=[live_updates.publish_changes, metrics.count_invalidations]
        )
        directory = TenantDirectory(runtime)
        live_updates.bind(runtime, directory)
        analytics = DashboardAnalytics(
            runtime,
            settings.analytics_interval,
            interval_lock(runtime, lease=settings.analytics_interval),
            publish=live_updates.realtime.publish_tenant_event,
        )
        # Before the worker starts: it counts the invalidations the worker applies.
        metrics.attach(runtime, realtime=live_updates.realtime, analytics=analytics)
        await runtime.start()
        try:
            app.state.runtime = runtime
            app.state.tenant_directory = directory
            app.state.analytics = analytics
            await live_updates.start()
            demo = await ensure_demo(runtime) if settings.demo else []
            analytics.start()
            await monitor.start()
            if on_ready is not None:
                on_ready(runtime, demo)
            yield
        finally:
            await monitor.stop()
            await analytics.stop()
            metrics.detach()
            try:
                await runtime.stop()  # the worker first: it publishes live updates
            finally:
                await live_updates.stop()

    app = FastAPI(
        title="freshcache marketplace",
        summary="The specification's multi-tenant marketplace, with fresh caches.",
        lifespan=lifespan,
        # An id like "..%2F" must be a 404 here, not a redirect to another path.
        redirect_slashes=False,
    )
    app.state.metrics = metrics
    app.state.live = live_updates
    app.state.monitor = monitor
    install_error_handlers(app)
    routers = (tenant_routes, products, catalog, marketplace, orders, reports, ops)
    for module in (*routers, monitoring_routes, dashboard_page):
        app.include_router(module.router)
    live_updates.mount(app)
    # Added last is outermost: the latency measured includes the caching headers' work.
    app.add_middleware(CacheResultHeaderMiddleware)
    app.add_middleware(HttpCacheMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
