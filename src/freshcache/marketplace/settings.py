"""The service's configuration: one dataclass, read from ``FRESHCACHE_*`` variables.

Nothing set gives the embedded default (SQLite in ``FRESHCACHE_DATA_DIR``, memory store,
in-process bus, relay and worker). ``FRESHCACHE_DATABASE_URL`` (PostgreSQL) and
``FRESHCACHE_REDIS_URL`` switch to production: several instances share the database and
Redis (Redis store, Redis Streams bus, Redis pub/sub broadcast).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = ["Settings", "normalise_database_url"]


def normalise_database_url(url: str) -> str:
    """The SQLAlchemy async URL for ``url``: ``postgresql://`` (libpq style) becomes
    ``postgresql+asyncpg://``, ``sqlite://`` becomes ``sqlite+aiosqlite://``."""
    for plain, driver in (
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ):
        if url.startswith(plain):
            return driver + url[len(plain) :]
    if url.startswith(("postgresql+asyncpg://", "sqlite+aiosqlite://")):
        return url
    raise ValueError(
        f"FRESHCACHE_DATABASE_URL: expected postgresql:// or sqlite://, got {url.split(':')[0]!r}"
    )


def _switch(variable: str, value: str) -> bool:
    """An on/off variable's value (a typo must not silently leave a switch as it was)."""
    setting = value.strip().lower()
    if setting in ("on", "1", "true"):
        return True
    if setting in ("off", "0", "false"):
        return False
    raise ValueError(f"{variable}: expected on or off, got {value!r}")


def _seconds(variable: str, value: str | None, default: float) -> float:
    """A duration variable's value in seconds (``default`` when unset)."""
    if not value:
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{variable}: expected a number of seconds, got {value!r}") from None


@dataclass(frozen=True)
class Settings:
    """How one service instance runs.

    - ``data_dir``: holds the SQLite file (embedded default) and ``demo.json``, the demo
      tenants' tokens (``FRESHCACHE_DATA_DIR``, default ``./.freshcache``).
    - ``database_url``: an SQLAlchemy URL; ``None`` means SQLite in ``data_dir``
      (``FRESHCACHE_DATABASE_URL``).
    - ``redis_url``: Redis for the cache store, the bus and the broadcast; ``None`` means
      in-process ones (``FRESHCACHE_REDIS_URL``).
    - ``admin_token``: creates tenants and edits the category taxonomy
      (``FRESHCACHE_ADMIN_TOKEN``; a random one is generated when unset).
    - ``demo``: create demo tenants, categories, shops and products on first start.
    - ``run_pipeline``: run the outbox relay and an invalidation worker in this process
      (``FRESHCACHE_RUN_PIPELINE``, default on). Turn it off on instances when separate
      ``freshcache worker`` processes do the work.
    - ``relay_poll_interval``: seconds between outbox polls (SQLite cannot notify; on
      PostgreSQL the relay is also woken at each commit).
    - ``rules_path``: the dependency rules YAML; ``None`` is the service's packaged
      ``rules.yaml`` (``FRESHCACHE_RULES``).
    - ``key_prefix``: starts every physical cache key (``FRESHCACHE_KEY_PREFIX``).
    - ``cache_enabled``: serve cached reads from the cache (default). ``False``
      (``FRESHCACHE_CACHE=off``) loads every one from the database and answers it as a
      miss, to measure what the cache saves; invalidations and HTTP caching headers are
      unchanged.
    - ``analytics_interval``: seconds between two pre-computations of every tenant's
      dashboard figures (``FRESHCACHE_ANALYTICS_INTERVAL``, default 300: the
      specification's 5 to 15 minutes); one instance of the deployment runs each.
    - ``monitor_interval``: seconds between two evaluations of the alert rules, each of
      which also records a point of the operator's charts (``FRESHCACHE_MONITOR_INTERVAL``,
      default 10).
    - ``near_cache_ttl``: with Redis, keep cached values in each instance's memory too,
      at most this many seconds (``FRESHCACHE_NEAR_CACHE_TTL``; unset or 0: off). Every
      invalidation then waits until every instance has dropped its copies (at most
      ``confirm_seconds``, ``FRESHCACHE_CONFIRM_SECONDS``, default 0.5), so a write is
      still seen by the next read on any instance.
    - ``varnish_urls``: the Varnish instances in front of the service
      (``FRESHCACHE_VARNISH_URLS``, space- or comma-separated, e.g.
      ``http://127.0.0.1:6081``), purged by surrogate key with each invalidation.
    """

    data_dir: Path = Path(".freshcache")
    database_url: str | None = None
    redis_url: str | None = None
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    admin_token_generated: bool = False
    demo: bool = True
    run_pipeline: bool = True
    relay_poll_interval: float = 0.5
    rules_path: Path | None = None
    key_prefix: str = "fc:"
    cache_enabled: bool = True
    analytics_interval: float = 300.0
    monitor_interval: float = 10.0
    varnish_urls: tuple[str, ...] = ()
    near_cache_ttl: float = 0.0
    confirm_seconds: float = 0.5

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``FRESHCACHE_*`` variables (``os.environ`` by default);
        ``overrides`` (e.g. ``demo=False`` from ``--no-demo``) win."""
        env = os.environ if environ is None else environ
        admin_token = env.get("FRESHCACHE_ADMIN_TOKEN") or None
        rules = env.get("FRESHCACHE_RULES") or None
        settings = cls(
            data_dir=Path(env.get("FRESHCACHE_DATA_DIR") or ".freshcache"),
            database_url=env.get("FRESHCACHE_DATABASE_URL") or None,
            redis_url=env.get("FRESHCACHE_REDIS_URL") or None,
            admin_token=admin_token or secrets.token_urlsafe(24),
            admin_token_generated=admin_token is None,
            run_pipeline=env.get("FRESHCACHE_RUN_PIPELINE", "1").lower() not in ("0", "false"),
            rules_path=None if rules is None else Path(rules),
            key_prefix=env.get("FRESHCACHE_KEY_PREFIX") or "fc:",
            cache_enabled=_switch("FRESHCACHE_CACHE", env.get("FRESHCACHE_CACHE") or "on"),
            analytics_interval=_seconds(
                "FRESHCACHE_ANALYTICS_INTERVAL", env.get("FRESHCACHE_ANALYTICS_INTERVAL"), 300.0
            ),
            monitor_interval=_seconds(
                "FRESHCACHE_MONITOR_INTERVAL", env.get("FRESHCACHE_MONITOR_INTERVAL"), 10.0
            ),
            near_cache_ttl=_seconds(
                "FRESHCACHE_NEAR_CACHE_TTL", env.get("FRESHCACHE_NEAR_CACHE_TTL"), 0.0
            ),
            confirm_seconds=_seconds(
                "FRESHCACHE_CONFIRM_SECONDS", env.get("FRESHCACHE_CONFIRM_SECONDS"), 0.5
            ),
            varnish_urls=tuple(
                (env.get("FRESHCACHE_VARNISH_URLS") or "").replace(",", " ").split()
            ),
        )
        return replace(settings, **overrides)

    def __post_init__(self) -> None:
        if self.database_url is not None:
            object.__setattr__(self, "database_url", normalise_database_url(self.database_url))
        if len(self.admin_token) < 16:
            raise ValueError("FRESHCACHE_ADMIN_TOKEN must be at least 16 characters")
        if self.relay_poll_interval <= 0:
            raise ValueError("relay_poll_interval must be > 0")
        if self.analytics_interval <= 0 or self.monitor_interval <= 0:
            raise ValueError("analytics_interval and monitor_interval must be > 0")

    @property
    def sqlalchemy_url(self) -> str:
        """The database the service uses."""
        if self.database_url is not None:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'freshcache.db').resolve()}"

    @property
    def embedded(self) -> bool:
        """Whether the cache, bus and broadcast live in this process (no Redis)."""
        return self.redis_url is None
