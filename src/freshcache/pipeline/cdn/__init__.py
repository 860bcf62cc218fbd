"""CDN purgers: remove the HTTP responses built from changed data from the caches in front
of the application.

A purger removes responses by tag (the surrogate keys the application sends in its
``xkey`` / ``Surrogate-Key`` headers) or by path. Implementations:

- :class:`VarnishPurger` purges by tag with varnish-modules' xkey and by path with bans
  (``deploy/varnish/default.vcl`` is the matching configuration);
- :class:`CloudFrontPurger` creates CloudFront invalidations through boto3 (CloudFront has
  no tags: a user-supplied function maps each tag to paths);
- :class:`NullPurger` does nothing, for deployments without a CDN;
- :class:`CoalescingPurger` wraps another purger so that a burst of requests for the same
  tags or paths becomes one purge.

Purge only after the database transaction that changed the data has committed. A purge
sent before the commit lets the CDN refetch and store the old data again, and nothing
would purge it afterwards.

Paths start with ``/``. A trailing ``*`` makes a path a prefix (``/products/*``), as in
CloudFront; ``*`` anywhere else is rejected.
"""

from freshcache.pipeline.cdn.base import CdnPurger, NullPurger, PurgeError
from freshcache.pipeline.cdn.cloudfront import CloudFrontPurger
from freshcache.pipeline.cdn.coalescing import CoalescingPurger
from freshcache.pipeline.cdn.varnish import VarnishPurger

__all__ = [
    "CdnPurger",
    "CloudFrontPurger",
    "CoalescingPurger",
    "NullPurger",
    "PurgeError",
    "VarnishPurger",
]
