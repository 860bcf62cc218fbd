"""The reference service of the specification: a multi-tenant marketplace API (tenants,
shops, products, categories, stock, orders, reports, marketplace search) whose caches
stay fresh. Build it with :func:`create_app`; ``freshcache serve`` runs it."""

from freshcache.marketplace.app import create_app
from freshcache.marketplace.settings import Settings

__all__ = ["Settings", "create_app"]
