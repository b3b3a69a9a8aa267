"""The cached path: lookup -> freshness -> coalesce -> fetch -> store, serving stale when
that is allowed, revalidating with the stored validators, and sparing the upstream."""

from __future__ import annotations

import logging
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from urllib.parse import unquote

import aiohttp
from aiohttp import web

from proxy.accesslog import KEY
from proxy.attempt import Attempt, Resolved, fits, unkeyed_credentials, upstream_headers
from proxy.bodies import GZIP_WBITS, inflate_limit
from proxy.coalesce import Flight
from proxy.deps import Deps
from proxy.entry import CachedResponse
from proxy.errors import UpstreamError
from proxy.headers import (
    NOT_STORED,
    end_to_end,
    fold,
    has_validators,
    joined,
    keep_gzip_vary,
    stored_headers,
)
from proxy.keys import upstream_target
from proxy.metrics import SAVED_OUTCOMES
from proxy.origin import updated_headers
from proxy.policy import (
    DontStore,
    Expired,
    Fresh,
    Stale,
    Storability,
    Store,
    api_error,
    current_age,
    freshness,
    is_upstream_failure,
    storability,
)
from proxy.respond import (
    NAME,
    private_response,
    relay,
    serve_entry,
    upstream_error,
)
from proxy.store.layered import Found
from proxy.upstream import read_limited

log = logging.getLogger(__name__)

# Reasons a response may not even be handed to concurrent waiters: it belongs to one client.
_PRIVATE_REASONS = frozenset({"set-cookie", "private", "no-store", "vary"})
# What storability reads, each folded into one value.
_POLICY_FIELDS = ("Cache-Control", "Vary", "Expires", "Date", "Last-Modified", "Age")
Served = tuple[web.StreamResponse, str]  # the response and its outcome label


class CachedPath:
    """Serves GET and HEAD for routes with a TTL class."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self._refreshing: set[str] = set()  # keys with a background refresh running

    async def serve(
        self, request: web.BaseRequest, resolved: Resolved, body: bytes | None = None
    ) -> Served:
        """Answer from the cache when the entry allows it, else fetch (once per key).
        `body`: a cached POST's body, which becomes part of the key."""
        key_headers = [
            (name, request.headers[name])
            for name in resolved.key_headers
            if name in request.headers
        ]
        cache_key = resolved.key.with_headers(key_headers) if key_headers else resolved.key
        content_type = coding = ""
        if body is not None:  # both go upstream as sent (the body is never inflated): keyed
            content_type = request.headers.get("Content-Type", "")
            coding = request.headers.get("Content-Encoding", "")
            cache_key = cache_key.with_body(content_type, coding, body)
        key = cache_key.text
        if self.deps.config.server.access_log:
            request[KEY] = key  # for the access log (hashed there)
        unkeyed = unkeyed_credentials(request.headers, resolved)

        def attempt(previous: CachedResponse | None = None, stale: bool = False) -> Attempt:
            # Only requests that go upstream (or start a refresh) pay for building this.
            headers = upstream_headers(request.headers, key_headers, unkeyed)
            if content_type:
                headers["Content-Type"] = content_type
            if coding:
                headers["Content-Encoding"] = coding
            held = previous if stale else None
            return Attempt(resolved, key, headers, previous, held, body, unkeyed)

        store = self.deps.store
        found = await store.lookup(key)
        if found is not None and not fits(found.entry, unkeyed):
            found = None  # another value's answer: never served, revalidated or stood in
        served = await self._answer(request, resolved, found, attempt)
        # Popularity counts only answers from a stored entry (a miss that stored counted
        # itself in _fetch): a flood of failing or unstorable keys must not fill the set.
        if served[1] in SAVED_OUTCOMES:
            store.popularity.count(key)
        return served

    async def _answer(
        self, request: web.BaseRequest, resolved: Resolved, found: Found | None,
        attempt: Callable[..., Attempt],
    ) -> Served:  # fmt: skip
        """Serve what the lookup found if its freshness allows, else go upstream."""
        if found is None:
            return await self._miss(request, attempt())
        entry = found.entry
        now = self.deps.clock()
        cls = resolved.match.route.ttl_class
        ahead = cls.refresh_ahead if cls else 0.0
        verdict = freshness(entry.stored_at, entry.ttl, entry.grace, entry.keep, ahead, now)
        if found.soft_purged:  # go upstream; the old entry stands in on failure, in its window
            usable = not isinstance(verdict, Expired) or verdict.usable_on_error
            return await self._miss(request, attempt(entry, stale=usable))
        age = current_age(entry.initial_age, entry.stored_at, now)
        if isinstance(verdict, Fresh):
            if verdict.refresh:
                self._refresh_soon(attempt(entry))
            status = f"{NAME}; hit; ttl={int(verdict.ttl_left)}; detail={found.layer}"
            return serve_entry(request, entry, status, age), f"hit_{found.layer}"
        if isinstance(verdict, Stale):
            self._refresh_soon(attempt(entry))
            status = f"{NAME}; hit; fwd=stale; detail=stale-while-revalidate"
            return serve_entry(request, entry, status, age), "stale"
        return await self._miss(request, attempt(entry, stale=verdict.usable_on_error))

    # --- misses ------------------------------------------------------------------------

    async def _miss(self, request: web.BaseRequest, attempt: Attempt) -> Served:
        coalescer = self.deps.coalescer
        if (future := coalescer.in_flight(attempt.key)) is not None:
            shared = await coalescer.wait(future, self.deps.config.server.coalesce_timeout)
            if isinstance(shared, CachedResponse) and fits(shared, attempt.unkeyed):
                status = f"{NAME}; fwd=miss; collapsed"
                return serve_entry(request, shared, status, _miss_age(shared)), "coalesced"
            if isinstance(shared, UpstreamError):
                return self._failed(request, shared, attempt.stale)
            try:  # nothing to share with this request: fetch, still covered by stale-if-error
                return await self._fetch(request, attempt, None)
            except UpstreamError as e:
                return self._failed(request, e, attempt.stale)
        with coalescer.lead(attempt.key) as flight:
            try:
                return await self._lead(request, attempt, flight)
            except UpstreamError as e:
                flight.result = e
                return self._failed(request, e, attempt.stale)

    async def _lead(self, request: web.BaseRequest, attempt: Attempt, flight: Flight) -> Served:
        """This instance's one fetch of key, first asking other instances (a Redis lease)."""
        store, key = self.deps.store, attempt.key
        if store.l2 is None:
            return await self._fetch(request, attempt, flight)
        redis = self.deps.config.cache.redis
        seen = attempt.previous.stored_at if attempt.previous else float("-inf")
        if not await store.leases.acquire(key, redis.lease_ttl):
            # Another instance is fetching it: wait (bounded) for its answer to reach L2.
            found = await store.leases.wait_for_l2(key, redis.lease_wait, newer_than=seen)
            if found is None or not fits(found.entry, attempt.unkeyed):
                return await self._fetch(request, attempt, flight)
        else:
            try:
                # Another instance may have fetched, stored and let go of the lease between
                # our L2 read and our taking it: look again before fetching a second time.
                found = await store.leases.fetched_since(key, seen)
                if found is None or not fits(found.entry, attempt.unkeyed):
                    return await self._fetch(request, attempt, flight)
            finally:
                store.leases.release(key)
        flight.result = found.entry
        status = f"{NAME}; fwd=miss; collapsed; detail=l2"
        return serve_entry(request, found.entry, status, _miss_age(found.entry)), "coalesced"

    def _failed(
        self, request: web.BaseRequest, error: UpstreamError, stale: CachedResponse | None
    ) -> Served:
        """The upstream failed: the stale entry if it may stand in, else the error."""
        if stale is None:
            return upstream_error(error), "error"
        now = self.deps.clock()
        status = f"{NAME}; hit; fwd=stale; fwd-status={error.status}; detail=stale-if-error"
        age = current_age(stale.initial_age, stale.stored_at, now)
        return serve_entry(request, stale, status, age), "stale_error"

    @asynccontextmanager
    async def _upstream(
        self, attempt: Attempt, wait: float | None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET the target from its upstream, conditionally when we hold an entry (HEAD misses
        fill the entry too). `wait` bounds the wait for a rate-limit token."""
        route = attempt.resolved.match.route
        upstream = self.deps.upstreams.upstream(route.upstream)
        target = upstream_target(attempt.resolved.target, upstream.query)
        pool = self.deps.upstreams
        headers = attempt.validated()
        method = "GET" if attempt.body is None else "POST"
        async with pool.request(
            route.upstream, method, target, headers, data=attempt.body, wait=wait
        ) as resp:
            yield resp

    def _entry(
        self, resp: aiohttp.ClientResponse, body: bytes, attempt: Attempt, asked_at: float
    ) -> tuple[CachedResponse, Storability]:
        """The entry an upstream response makes (a 304 renews the held one), and whether it
        may be stored."""
        resolved = attempt.resolved
        cls = resolved.match.route.ttl_class
        assert cls is not None
        now = self.deps.clock()
        held = attempt.previous
        if resp.status == 304 and held is not None:  # RFC 9111 4.3.4: freshen what we hold
            status, body = held.status, held.body
            fresh = tuple(
                (n, v) for n, v in end_to_end(resp.headers) if n.lower() not in NOT_STORED
            )
            headers = keep_gzip_vary(updated_headers(held.headers, fresh))
            fields = fold(headers, _POLICY_FIELDS)
        else:
            status, headers = resp.status, stored_headers(resp.headers)
            fields = joined(resp.headers, _POLICY_FIELDS)
        verdict = storability(
            status, fields, "Set-Cookie" in resp.headers, len(body), cls,
            self.deps.config.cache.max_object_size, now, asked_at,
            authorized="Authorization" in attempt.headers, unkeyed=attempt.unkeyed,
        )  # fmt: skip
        lifetime = Store(0.0) if isinstance(verdict, DontStore) else verdict.bounded()
        entry = CachedResponse(
            status=status,
            headers=headers,
            body=body,
            # When it was asked for: a purge after that may not be undone by a slow answer.
            stored_at=min(now, asked_at),
            ttl=lifetime.ttl,
            initial_age=lifetime.initial_age,
            route=resolved.match.route.name,
            tags=tuple(f"{k}={unquote(v)}" for k, v in resolved.match.params.items()),
            grace=lifetime.grace,
            keep=lifetime.keep,
        )
        if has_validators(headers):  # keep it one more ttl, so a refetch can be a cheap 304
            entry = replace(entry, revalidate=max(entry.ttl, 60.0))
        return entry, verdict

    async def _fetch(
        self, request: web.BaseRequest, attempt: Attempt, flight: Flight | None
    ) -> Served:
        """Fetch for a waiting client: store what may be stored, answer, share with waiters.
        With a stale entry in hand, never wait for a rate-limit token: serve that instead."""
        asked_at = self.deps.clock()
        stale = attempt.stale
        async with self._upstream(attempt, 0.0 if stale else None) as resp:
            chunks, complete = await read_limited(resp, self.deps.config.cache.max_object_size)
            if not complete:
                detail = "fwd=miss; detail=too-large"
                relayed = await relay(
                    request, resp, chunks, detail, inflate=True, close=self.deps.closing
                )
                return relayed, "miss"
            body = b"".join(chunks)
            api = self._api_error(resp, body, attempt.resolved)
            if stale is not None and (api or is_upstream_failure(resp.status)):
                error = UpstreamError("status", f"upstream answered {resp.status}", resp.status)
                if flight is not None:
                    flight.result = error
                return self._failed(request, error, stale)
            entry, verdict = self._entry(resp, body, attempt, asked_at)
            if api:
                verdict = DontStore("api-error")
                entry = replace(entry, ttl=0.0, grace=0.0, keep=0.0)
            revalidated = resp.status == 304 and attempt.previous is not None
            fwd = "fwd=stale; fwd-status=304" if revalidated else "fwd=miss"
            if isinstance(verdict, DontStore):
                if verdict.reason in _PRIVATE_REASONS and not revalidated:
                    detail = f"fwd=miss; detail={verdict.reason}"
                    return private_response(request, resp, entry.body, detail), "miss"
                status = f"{NAME}; {fwd}; detail={verdict.reason}"
            else:
                await self.deps.store.set(attempt.key, entry)
                self.deps.store.popularity.count(attempt.key)
                status = f"{NAME}; {fwd}; stored"
            # What is not stored is shared with waiters only when they would have sent the
            # same request: nothing unkeyed went upstream. Else they fetch for themselves.
            if flight is not None and not (attempt.unkeyed and isinstance(verdict, DontStore)):
                flight.result = entry
            return serve_entry(request, entry, status, _miss_age(entry)), "miss"

    def _api_error(
        self, resp: aiohttp.ClientResponse, body: bytes, resolved: Resolved
    ) -> str | None:
        """Why this 200 is an API error in disguise (the route's markers), or None. Counted as
        an upstream error, and against the upstream's breaker."""
        route = resolved.match.route
        if resp.status != 200 or not (route.error_keys or route.error_text):
            return None
        plain = body
        if resp.headers.get("Content-Encoding", "").strip().lower() == "gzip":
            # An error body is small: read no more of it than an entry may hold, and never
            # more than a hit would inflate (a bomb costs no more memory here than a miss).
            limit = min(inflate_limit(len(body)), self.deps.config.cache.max_object_size)
            try:
                plain = zlib.decompressobj(GZIP_WBITS).decompress(body, limit)
            except zlib.error:
                return None
        reason = api_error(plain, route.error_keys, route.error_text)
        if reason is not None:
            log.warning("upstream %s answered an API error for %s: %s", route.upstream,
                        route.name, reason)  # fmt: skip
            self.deps.metrics.upstream_error(route.upstream, "api-error", answered=True)
            self.deps.upstreams.failed(route.upstream, resp, "api-error")
        return reason

    async def warm(self, resolved: Resolved) -> bool:
        """Fetch and store one target unless it is already fresh (warm start)."""
        key = resolved.key.text
        found = await self.deps.store.lookup(key)
        if found is not None and found.entry.expires_at > self.deps.clock():
            return True
        headers = {"Accept-Encoding": "gzip"}
        held = found.entry if found else None
        await self._refresh(Attempt(resolved, key, headers, held), wait=None)  # may wait a slot
        found = await self.deps.store.lookup(key)
        return found is not None

    # --- background refreshes ----------------------------------------------------------

    def _refresh_soon(self, attempt: Attempt) -> None:
        """Start one background refresh of key, unless one is already running."""
        key = attempt.key
        if key in self._refreshing or self.deps.coalescer.in_flight(key) is not None:
            return
        self._refreshing.add(key)
        self.deps.tasks.spawn(self._refresh(attempt), "refresh")

    async def _refresh(self, attempt: Attempt, wait: float | None = 0.0) -> None:
        """Fetch (conditionally) and store a new copy. A failed refresh never replaces the
        entry we have. Requests waiting on it learn of an upstream failure (so stale-if-error
        applies to them at once); for anything else it could not store, they fetch for
        themselves. By default it never waits for a rate-limit token."""
        store, key = self.deps.store, attempt.key
        leased = False
        try:
            if store.l2 is not None:
                leased = await store.leases.acquire(key, self.deps.config.cache.redis.lease_ttl)
                if not leased:
                    return  # another instance refreshes it; its write reaches us by backplane
            with self.deps.coalescer.lead(key) as flight:
                asked_at = self.deps.clock()
                try:
                    async with self._upstream(attempt, wait) as resp:
                        limit = self.deps.config.cache.max_object_size
                        chunks, complete = await read_limited(resp, limit)
                        body = b"".join(chunks)
                        if not complete:
                            return  # too large to keep: waiters fetch (and stream) themselves
                        failed = is_upstream_failure(resp.status)
                        if failed or self._api_error(resp, body, attempt.resolved):
                            flight.result = UpstreamError(
                                "status", f"upstream answered {resp.status}", resp.status
                            )
                            return
                        entry, verdict = self._entry(resp, body, attempt, asked_at)
                        if isinstance(verdict, DontStore):
                            return
                        await store.set(key, entry)
                        flight.result = entry
                except UpstreamError as e:
                    flight.result = e
                    log.info("background refresh of %s failed: %s", key, e)
        finally:
            self._refreshing.discard(key)
            if leased:
                store.leases.release(key)


def _miss_age(entry: CachedResponse) -> int | None:
    # RFC 9111 5.1: Age says the response was not generated by the origin just now;
    # on a miss we only relay what the upstream itself reported.
    return int(entry.initial_age) if entry.initial_age else None
