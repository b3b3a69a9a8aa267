"""Freshness and storability decisions. Pure: data and `now` in, a small verdict out."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from proxy.market import Market
from proxy.origin import (
    MAX_DELTA,
    corrected_initial_age,
    freshness_lifetime,
    parse_age,
    parse_cache_control,
    stale_windows,
)

# RFC 9110 15.1: heuristically cacheable status codes (501 excluded: we never store 5xx).
# The only statuses storability() lets through (a 304 renews an entry under its own status),
# so the only ones an entry may hold: entry.decode refuses any other read from L2.
STORABLE_STATUS: Final = frozenset({200, 203, 204, 300, 301, 308, 404, 410})
_NEGATIVE_STATUS: Final = frozenset({404, 410})


@dataclass(frozen=True, slots=True)
class TTLClass:
    """How long responses of one kind stay fresh, and how long stale ones stay useful."""

    name: str
    ttl: float
    negative_ttl: float  # for 404 and 410
    origin: bool = False  # `ttl: origin`: the upstream's Cache-Control decides (RFC 9111)
    stale_while_revalidate: float = 0.0  # after ttl: serve stale, refresh in the background
    stale_if_error: float = 0.0  # after ttl: serve stale when the upstream fails
    refresh_ahead: float = 0.0  # fraction of ttl after which a hit refreshes early (0: off)
    closed_ttl: float | None = None  # while `market` is closed: live until it opens, capped
    market: Market | None = None

    def lifetime(self, now: float) -> float:
        """The ttl for a response fetched at `now` (longer while the market is closed)."""
        if self.closed_ttl is not None and self.market is not None:
            closed = self.market.closed_lifetime(now, self.closed_ttl)
            if closed is not None:
                return closed
        return self.ttl


@dataclass(frozen=True, slots=True)
class Fresh:
    """Serve as is; `ttl_left` seconds of freshness remain. `refresh`: refresh-ahead is due,
    so fetch a new copy in the background while this one is still fresh."""

    ttl_left: float
    refresh: bool = False


@dataclass(frozen=True, slots=True)
class Stale:
    """Past its ttl but within stale-while-revalidate: serve now, refresh in the background
    (RFC 5861 3)."""

    stale_for: float


@dataclass(frozen=True, slots=True)
class Expired:
    """Go upstream. `usable_on_error`: within stale-if-error, so if the upstream fails the
    entry may be served instead of the error (RFC 5861 4)."""

    usable_on_error: bool = False


Freshness = Fresh | Stale | Expired


@dataclass(frozen=True, slots=True)
class Store:
    """Store the response: fresh for `ttl` seconds, then usable stale for `grace` (while
    refreshing) and `keep` (on upstream error); it was `initial_age` old on arrival."""

    ttl: float
    grace: float = 0.0
    keep: float = 0.0
    initial_age: float = 0.0

    def bounded(self) -> Store:
        """The lifetime as an entry holds it: each part at most 2^31 s, which is what a
        larger delta-seconds means (RFC 9111 1.2.2), so `Expires: 9999` or a huge `Age`
        make an entry any reader takes for one this proxy wrote (entry.decode)."""
        cap = float(MAX_DELTA)
        return Store(
            min(self.ttl, cap), min(self.grace, cap), min(self.keep, cap),
            min(self.initial_age, cap),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class DontStore:
    """Do not store the response, for `reason` (shown in Cache-Status detail)."""

    reason: str

    @property
    def private(self) -> bool:
        """The answer belongs to the one client it was fetched for: not even requests waiting
        on the same fetch may have it (RFC 9111 3.5, 4.1, 5.2.2.5, 5.2.2.7)."""
        return self.reason in _PRIVATE_REASONS


_PRIVATE_REASONS: Final = frozenset({"set-cookie", "private", "no-store", "vary"})


Storability = Store | DontStore


@dataclass(frozen=True, slots=True)
class Lookup:
    """Serve the request from the cache when possible."""


@dataclass(frozen=True, slots=True)
class Bypass:
    """Forward the request without looking in or writing to the cache."""

    reason: str


RequestVerdict = Lookup | Bypass

CACHEABLE_METHODS: Final = frozenset({"GET", "HEAD"})
MAX_POST_KEY_BODY: Final = 64 * 1024  # larger POST bodies are forwarded, never keyed


def classify_request(
    method: str,
    ttl_class: TTLClass | None,
    has_credentials: bool,
    shared: bool,
    cache_post: bool = False,
    body_size: int | None = None,
    content_type: str = "",
) -> RequestVerdict:
    """Whether a request may use the shared cache (README: What is cached, and what the
    proxy decided).

    POST only on routes that opt in (`cache_post`), keyed on the body, and only with a
    declared body of at most MAX_POST_KEY_BODY bytes. Never a multipart body: its boundary
    is random per request, so each would be stored and none ever hit again (RFC 2046 5.1.1).
    """
    if ttl_class is None:
        return Bypass("route-pass")
    if method == "POST" and cache_post:
        if body_size is None or body_size > MAX_POST_KEY_BODY:
            return Bypass("post-body")
        if content_type.partition(";")[0].strip().lower().startswith("multipart/"):
            return Bypass("post-multipart")
    elif method not in CACHEABLE_METHODS:
        return Bypass("method")
    # RFC 9111 3.5: a shared cache must not reuse a response to an authenticated request
    # unless told it may; the route's `shared: true` is that statement.
    if has_credentials and not shared:
        return Bypass("credentials")
    return Lookup()


def storability(
    status: int,
    headers: Mapping[str, str],
    set_cookie: bool,
    body_size: int,
    ttl_class: TTLClass,
    max_object_size: int,
    now: float = 0.0,
    request_time: float | None = None,
    authorized: bool = False,
    unkeyed: frozenset[str] = frozenset(),
) -> Storability:
    """Whether an upstream response may be stored, and for how long (RFC 9111 3).

    `headers` holds each field's lines folded into one value (RFC 9110 5.3): at least
    Cache-Control and Vary, and for `ttl: origin` also Expires, Date, Last-Modified and Age.
    `now` is when the response arrived, `request_time` when it was asked for. `unkeyed`:
    the request headers (lower-case names) that went upstream without being in the key.
    """
    if status >= 500:
        return DontStore("status-5xx")
    if status == 429:
        return DontStore("status-429")
    if status not in STORABLE_STATUS:
        return DontStore(f"status-{status}")
    if set_cookie:
        return DontStore("set-cookie")
    cache_control = parse_cache_control(headers.get("Cache-Control", ""))
    if "no-store" in cache_control:  # RFC 9111 5.2.2.5
        return DontStore("no-store")
    if "private" in cache_control:  # RFC 9111 5.2.2.7: shared caches must not store
        return DontStore("private")
    if "no-cache" in cache_control:
        # RFC 9111 5.2.2.4: reuse needs revalidation every time, which buys nothing here;
        # the qualified form (no-cache="field") would need those fields stripped: not stored.
        return DontStore("no-cache")
    vary = headers.get("Vary", "")
    if unkeyed and varies_on(vary, unkeyed):
        # RFC 9111 4.1: it is the answer to this request's value of a header the key does
        # not hold, so it matches only requests with that same value: one client's answer.
        return DontStore("vary")
    if any(v.strip() == "*" for v in vary.split(",")):
        return DontStore("vary-star")  # RFC 9111 4.1: matches no later request
    if body_size > max_object_size:
        return DontStore("too-large")
    cls = ttl_class
    if (
        cls.origin
        and authorized
        and not {"public", "s-maxage", "must-revalidate"} & (cache_control.keys())
    ):
        return DontStore("authorization")  # RFC 9111 3.5
    if cls.origin:
        age = corrected_initial_age(headers, now if request_time is None else request_time, now)
        ttl = freshness_lifetime(status, headers, now) - age
        grace, keep = stale_windows(cache_control, cls.stale_while_revalidate, cls.stale_if_error)
        if ttl <= 0 and grace <= 0 and keep <= 0:
            return DontStore("stale-on-arrival")
        return Store(max(0.0, ttl), grace, keep, age)
    ttl = cls.negative_ttl if status in _NEGATIVE_STATUS else cls.lifetime(now)
    if ttl <= 0:
        return DontStore("ttl-zero")
    age_value = parse_age(headers.get("Age"))
    return Store(ttl, cls.stale_while_revalidate, cls.stale_if_error, age_value)


def varies_on(vary: str, names: frozenset[str]) -> bool:
    """Whether a (folded) Vary value names one of `names` (lower-case), or is `*`, which
    names them all (RFC 9110 12.5.5)."""
    fields = {name.strip().lower() for name in vary.split(",")}
    return "*" in fields or not fields.isdisjoint(names)


def freshness(
    stored_at: float, ttl: float, grace: float, keep: float, refresh_ahead: float, now: float
) -> Freshness:
    """Where an entry stored at `stored_at` stands at `now` (RFC 9111 4.2, RFC 5861)."""
    age = now - stored_at
    left = ttl - age
    if left > 0:
        return Fresh(left, refresh=refresh_ahead > 0 and age >= refresh_ahead * ttl)
    if -left < grace:
        return Stale(-left)
    return Expired(usable_on_error=-left < keep)


def api_error(body: bytes, keys: frozenset[str], text: tuple[bytes, ...]) -> str | None:
    """Why a 200 body is really an API error (a rate-limit note, an error message), or None.

    Market APIs do this: Alpha Vantage answers a rate limit with 200 {"Note": ...}, FMP with
    {"Error Message": ...}, Twelve Data with {"code": 429, ...}.
    """
    for marker in text:
        if marker in body:
            return f"body contains {marker.decode(errors='replace')!r}"
    if keys and body.lstrip()[:1] == b"{":
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: an upstream's `{"a": [[[[...`
            return None
        if isinstance(document, dict) and (found := keys & document.keys()):
            return f"body has key {sorted(found)[0]!r}"
    return None


def is_upstream_failure(status: int) -> bool:
    """Statuses that mean the upstream failed rather than answered (stale-if-error applies)."""
    return status >= 500 or status == 429


def current_age(initial_age: float, stored_at: float, now: float) -> int:
    """RFC 9111 4.2.3: the age the upstream reported plus our residence time, in seconds."""
    return int(max(0.0, initial_age) + max(0.0, now - stored_at))


def revalidation_window(ttl: float, validators: bool) -> float:
    """After its ttl, how long an entry with validators (ETag, Last-Modified) is kept, never
    served, so that fetching it again is a conditional request a 304 answers cheaply (RFC 9111
    4.3): one more ttl, at least a minute."""
    return max(ttl, 60.0) if validators else 0.0
