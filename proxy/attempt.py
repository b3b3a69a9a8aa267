"""One cacheable request as the cached path sees it: its route and key (Resolved), what goes
upstream for it (Attempt), and which held answers may serve it. Nothing goes upstream that
the key does not account for, except credentials on `shared: true` routes, which are named
(`unkeyed`) so that an answer varying on them stays with the client who sent them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from proxy.entry import CachedResponse
from proxy.headers import fold
from proxy.keys import CacheKey, Target
from proxy.policy import varies_on
from proxy.routes import Match

# Request headers a `shared: true` route forwards (RFC 9111 3.5) without keying on them,
# unless a key header names them; sent as spelled here, so the upstream's configured
# headers of the same name replace them (upstream.py).
_CREDENTIALS = {"authorization": "Authorization", "cookie": "Cookie"}
NONE: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Resolved:
    """A request target resolved against the routes; memoised per (method, raw target)."""

    match: Match
    target: Target
    key: CacheKey  # without its header and body parts
    key_headers: tuple[str, ...]  # request headers that complete the key


@dataclass(slots=True)  # not frozen: built per request, and a frozen __init__ costs 3x
class Attempt:
    """One cacheable request's state, also usable by a background refresh. Never changed
    once built (dataclasses.replace makes the variants)."""

    resolved: Resolved
    key: str  # the complete key's text (CacheKey.text): what stores, leases, flights use
    client: Mapping[str, str]  # the client's request headers (what goes upstream is chosen)
    key_headers: tuple[tuple[str, str], ...] = ()  # the client's headers that are in the key
    previous: CachedResponse | None = None  # what we hold, however old (its validators)
    stale: CachedResponse | None = None  # what may stand in if the upstream fails
    body: bytes | None = None  # a cached POST's body (part of its key)
    # Request headers (lower-case) that go upstream (headers()) but are not in the key: an
    # answer that varies on one of them is this client's alone (policy.storability).
    unkeyed: frozenset[str] = NONE

    def headers(self) -> dict[str, str]:
        """What goes upstream (see upstream_headers), plus a cached POST's Content-Type and
        Content-Encoding as sent (keyed with its body); built only by requests that go
        upstream, never by a hit."""
        headers = upstream_headers(self.client, self.key_headers, self.unkeyed)
        if self.body is not None:
            for name in ("Content-Type", "Content-Encoding"):
                if value := self.client.get(name):
                    headers[name] = value
        return headers

    def validated(self) -> dict[str, str]:
        """The upstream headers plus the held entry's validators (RFC 9111 4.3.1)."""
        headers = self.headers()
        held = self.previous
        if held is None or held.status != 200 or self.body is not None:
            return headers
        if (etag := held.header("ETag")) is not None:
            headers["If-None-Match"] = etag
        if (modified := held.header("Last-Modified")) is not None:
            headers["If-Modified-Since"] = modified
        return headers


def unkeyed_credentials(request: Mapping[str, str], resolved: Resolved) -> frozenset[str]:
    """The credentials (lower-case names) this request sends upstream outside its key: only
    on shared routes, which forward them; other routes bypass credentialed requests."""
    if not resolved.match.route.shared:
        return NONE
    return frozenset(
        name for name in _CREDENTIALS if name in request and name not in resolved.key_headers
    )


def upstream_headers(
    request: Mapping[str, str],
    key_headers: tuple[tuple[str, str], ...],
    unkeyed: frozenset[str],
) -> dict[str, str]:
    """Only what is in the key (and the unkeyed credentials, which storability weighs against
    the answer's Vary) travels upstream, so no other header can change what is stored for
    everyone. No X-Forwarded-For: the answer is fetched for everyone it will be served to,
    and no one client's address (or the chain it claims) belongs in that request."""
    headers = dict(key_headers)
    headers["Accept-Encoding"] = "gzip"
    for name in unkeyed:
        headers[_CREDENTIALS[name]] = request[name]
    return headers


def fits(entry: CachedResponse, unkeyed: frozenset[str]) -> bool:
    """Whether a held entry may answer a request that sends `unkeyed` upstream: not when it
    varies on one of them (RFC 9111 4.1). Such an entry was stored for a request without
    them (storability never stores one fetched with them), or by an older version."""
    return not unkeyed or not varies_on(fold(entry.headers, ("Vary",)).get("Vary", ""), unkeyed)
