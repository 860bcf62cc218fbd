"""What ``freshcache serve`` prints once the service is ready: where it listens, how it is
deployed, and the tokens to try it with."""

from __future__ import annotations

from freshcache.marketplace.demo import DemoTenant
from freshcache.marketplace.settings import Settings

__all__ = ["startup_banner"]


def startup_banner(settings: Settings, url: str, demo: list[DemoTenant]) -> str:
    """The banner's text."""
    if settings.embedded and settings.database_url is None:
        deployment = f"embedded (SQLite in {settings.data_dir.resolve()}, in-process cache and bus)"
    else:
        database = "SQLite" if settings.sqlalchemy_url.startswith("sqlite") else "PostgreSQL"
        cache = "in-process cache and bus" if settings.embedded else "Redis cache, bus, broadcast"
        deployment = f"{database}, {cache}"
    lines = [
        f"freshcache marketplace listening on {url}",
        f"  deployment: {deployment}",
        f"  pipeline:   {'relay and worker in this process' if settings.run_pipeline else 'off'}",
    ]
    if settings.embedded and settings.database_url is not None:
        lines.append(
            "  warning: without FRESHCACHE_REDIS_URL each instance has a cache of its own: "
            "run one instance only"
        )
    if settings.admin_token_generated:
        lines.append(
            f"  admin token (generated; set FRESHCACHE_ADMIN_TOKEN): {settings.admin_token}"
        )
    if demo:
        lines.append("  demo tenants (Authorization: Bearer <token>):")
        lines += [f"    {tenant.name}: {tenant.api_key}" for tenant in demo]
        token = demo[0].api_key
        lines.append(f"  try: curl -H 'Authorization: Bearer {token}' {url}/api/dashboard")
    lines.append(f"  dashboard: {url}/dashboard   API docs: {url}/docs   metrics: {url}/metrics")
    return "\n".join(lines)
