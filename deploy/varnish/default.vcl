#
# freshcache's Varnish configuration: an HTTP cache in front of the application that
# obeys the application's Cache-Control and can be purged by surrogate key (tag).
#
# Needs Varnish 7 and varnish-modules (for xkey):
#     apt-get install -y varnish varnish-modules
#
# Caching follows the application's response headers:
#   - Cache-Control max-age (or s-maxage) is the TTL; stale-while-revalidate is the grace:
#     after the TTL, Varnish serves the stale object for that long while it refetches it in
#     the background. Without stale-while-revalidate there is no grace.
#   - private, no-store and no-cache responses are passed, never cached; so are responses
#     that set cookies (Varnish's built-in rules). Requests with a Cookie or Authorization
#     header are passed too (built-in vcl_recv): if browsers send cookies to public
#     pages, remove them for those URLs in vcl_recv.
#   - Vary is respected: one object per variant.
#   - The response's tags come in `xkey: tag1 tag2` and/or `Surrogate-Key: tag1 tag2`
#     headers (both are indexed). Neither header, nor the internal x-url, reaches clients.
#
# Purging, allowed only from the `purgers` ACL below (answer 403 otherwise):
#   PURGE with `xkey-purge: tag1 tag2`   removes every object carrying any of those tags;
#                                        the answer is `200 Purged N objects` and an
#                                        `xkey-purged: N` header. With `xkey-soft: 1` the
#                                        objects are only expired (they stay available
#                                        for their grace, while a refetch runs).
#   PURGE /some/path                     removes that URL (all its variants) for the
#                                        request's Host.
#   BAN with `ban-url: <regex>`          bans every object whose URL (path and query,
#                                        any host) matches the PCRE2 regex.
#
# The backend below is the default: the application on 127.0.0.1:8000. Replace the block
# (from `backend default {` to its closing `}`) to point Varnish elsewhere; the tests do so
# to put their own origin behind it.
vcl 4.1;

import std;
import xkey;

backend default {
    .host = "127.0.0.1";
    .port = "8000";
}

acl purgers {
    "127.0.0.1";
    "::1";
}

sub vcl_recv {
    if (req.method == "PURGE" || req.method == "BAN") {
        if (client.ip !~ purgers) {
            return (synth(403, "Forbidden: this address may not purge"));
        }
        if (req.method == "BAN") {
            if (!req.http.ban-url) {
                return (synth(400, "BAN needs a ban-url header"));
            }
            # The x-url header is set on every stored object (see vcl_backend_response), so
            # the ban can be evaluated by the background ban lurker, not only at lookup.
            if (std.ban("obj.http.x-url ~ " + req.http.ban-url)) {
                return (synth(200, "Banned"));
            }
            return (synth(400, "Invalid ban: " + std.ban_error()));
        }
        if (req.http.xkey-purge) {
            if (req.http.xkey-soft == "1") {
                set req.http.xkey-purged = xkey.softpurge(req.http.xkey-purge);
            } else {
                set req.http.xkey-purged = xkey.purge(req.http.xkey-purge);
            }
            return (synth(200, "Purged " + req.http.xkey-purged + " objects"));
        }
        return (purge);
    }
    # Everything else (the methods, Authorization and Cookie rules) is Varnish's built-in
    # vcl_recv.
}

sub vcl_backend_response {
    set beresp.http.x-url = bereq.url;

    if (beresp.http.Surrogate-Key) {
        # A response may carry several lines of either header: fold each into one line
        # before joining them, since assigning a header keeps only the value assigned.
        std.collect(beresp.http.Surrogate-Key, " ");
        if (beresp.http.xkey) {
            std.collect(beresp.http.xkey, " ");
            # freshcache sends the same keys in both headers: index them once.
            if (beresp.http.xkey != beresp.http.Surrogate-Key) {
                set beresp.http.xkey = beresp.http.xkey + " " + beresp.http.Surrogate-Key;
            }
        } else {
            set beresp.http.xkey = beresp.http.Surrogate-Key;
        }
        unset beresp.http.Surrogate-Key;
    }

    # Varnish itself takes the grace from stale-while-revalidate. Without that directive
    # the application did not allow serving stale content, so no default grace either.
    if (beresp.http.Cache-Control !~ "(?i)stale-while-revalidate=\d+") {
        set beresp.grace = 0s;
    }
    # The TTL itself comes from max-age / s-maxage, which Varnish parses before this
    # subroutine. Varnish's built-in vcl_backend_response runs after this one and passes
    # (never caches) responses with a zero TTL, Set-Cookie, Vary: *, or Cache-Control
    # private, no-store or no-cache, remembering that for two minutes so concurrent
    # requests for such a URL go to the backend in parallel instead of queueing.
}

sub vcl_deliver {
    # Surrogate-Key never gets here: vcl_backend_response folded it into xkey.
    unset resp.http.xkey;
    unset resp.http.x-url;
    if (obj.hits > 0) {
        set resp.http.X-Cache = "HIT";
    } else {
        set resp.http.X-Cache = "MISS";
    }
}

sub vcl_synth {
    if (req.http.xkey-purged) {
        set resp.http.xkey-purged = req.http.xkey-purged;
    }
}
