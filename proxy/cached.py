"""The cached path: a request enters once (serve) and leaves once, as an Outcome and what to
answer with, rendered in one place (respond.render). In between: lookup, decide
(decisions.py), coalesce within the instance and across instances (leases), fetch, judge,
store. Stale entries stand in when the upstream fails; background refreshes use the same
fetcher."""

from __future__ import annotations

import logging
import zlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from typing import assert_never
from urllib.parse import unquote

import aiohttp
from aiohttp import web

from proxy import outcome as said
from proxy.accesslog import KEY
from proxy.attempt import Attempt, Resolved, fits, unkeyed_credentials
from proxy.bodies import GZIP_WBITS, inflate_limit
from proxy.coalesce import Flight
from proxy.decisions import (
    Failed,
    Private,
    Revalidate,
    Serve,
    ServeStale,
    Stored,
    Uncached,
    decide,
    judge,
)
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
from proxy.origin import updated_headers
from proxy.outcome import SAVED_OUTCOMES, Outcome
from proxy.policy import DontStore, Store, api_error, revalidation_window, storability
from proxy.respond import Answer, Relayed, Unshared, render
from proxy.upstream import read_limited

log = logging.getLogger(__name__)

# What storability reads, each folded into one value.
_POLICY_FIELDS = ("Cache-Control", "Vary", "Expires", "Date", "Last-Modified", "Age")
Answered = tuple[Outcome, Answer]


class CachedPath:
    """Serves GET and HEAD (and POST on `cache_post` routes) for routes with a TTL class."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self._refreshing: set[str] = set()  # keys with a background refresh running

    async def serve(
        self, request: web.BaseRequest, resolved: Resolved, body: bytes | None = None
    ) -> tuple[web.StreamResponse, Outcome]:
        """Answer from the cache when the entry allows it, else fetch (once per key).
        `body`: a cached POST's body, which becomes part of the key."""
        attempt = self._attempt(request, resolved, body)
        if self.deps.config.server.access_log:
            request[KEY] = attempt.key  # for the access log (hashed there)
        outcome, answer = await self._answer(attempt)
        # Popularity counts only answers from a stored entry (a miss that stored counted
        # itself in _fetch): a flood of failing or unstorable keys must not fill the set.
        if outcome.label in SAVED_OUTCOMES:
            self.deps.store.popularity.count(attempt.key)
        response = await render(request, outcome, answer, self.deps.clock, self.deps.closing)
        return response, outcome

    def _attempt(self, request: web.BaseRequest, resolved: Resolved, body: bytes | None) -> Attempt:
        """The request as the cached path sees it: its whole key, and what it would send
        upstream (built only if it goes there)."""
        headers = request.headers
        key_headers = tuple(
            (name, headers[name]) for name in resolved.key_headers if name in headers
        )
        key = resolved.key.with_headers(key_headers) if key_headers else resolved.key
        if body is not None:  # both go upstream as sent (the body is never inflated): keyed
            content_type = headers.get("Content-Type", "")
            coding = headers.get("Content-Encoding", "")
            key = key.with_body(content_type, coding, body)
        unkeyed = unkeyed_credentials(headers, resolved)
        return Attempt(resolved, key.text, headers, key_headers, body=body, unkeyed=unkeyed)

    async def _answer(self, attempt: Attempt) -> Answered:
        """Serve what the lookup found if its freshness allows, else go upstream."""
        found = await self.deps.store.lookup(attempt.key)
        if found is None or not fits(found.entry, attempt.unkeyed):
            # (Not fitting: another value's answer, never served, revalidated or stood in.)
            return await self._miss(attempt)
        entry = found.entry
        cls = attempt.resolved.match.route.ttl_class
        decision = decide(
            entry.stored_at, entry.ttl, entry.grace, entry.keep,
            cls.refresh_ahead if cls else 0.0, found.soft_purged, self.deps.clock(),
        )  # fmt: skip
        if isinstance(decision, Serve):
            if decision.refresh:
                self._refresh_soon(replace(attempt, previous=entry))
            return said.hit(found.layer, decision.ttl_left), entry
        if isinstance(decision, ServeStale):
            self._refresh_soon(replace(attempt, previous=entry))
            return said.STALE, entry
        if isinstance(decision, Revalidate):
            stale = entry if decision.stand_in else None
            return await self._miss(replace(attempt, previous=entry, stale=stale))
        assert_never(decision)

    # --- misses ------------------------------------------------------------------------

    async def _miss(self, attempt: Attempt) -> Answered:
        """One fetch per key: wait for the one in flight here, or lead it."""
        coalescer = self.deps.coalescer
        if (future := coalescer.in_flight(attempt.key)) is not None:
            shared = await coalescer.wait(future, self.deps.config.server.coalesce_timeout)
            if isinstance(shared, CachedResponse) and fits(shared, attempt.unkeyed):
                return said.COLLAPSED, shared
            if isinstance(shared, UpstreamError):
                return _failed(shared, attempt.stale)
            # Nothing to share with this request: fetch, still covered by stale-if-error.
            return await self._fetched(attempt, None)
        with coalescer.lead(attempt.key) as flight:
            return await self._lead(attempt, flight)

    async def _lead(self, attempt: Attempt, flight: Flight) -> Answered:
        """This instance's one fetch of key, first asking other instances (a Redis lease)."""
        store, key = self.deps.store, attempt.key
        if not store.leases.shared:
            return await self._fetched(attempt, flight)
        redis = self.deps.config.cache.redis
        seen = attempt.previous.stored_at if attempt.previous else float("-inf")
        if not await store.leases.acquire(key, redis.lease_ttl):
            # Another instance is fetching it: wait (bounded) for its answer to reach L2.
            found = await store.leases.wait_for_l2(key, redis.lease_wait, newer_than=seen)
            if found is None or not fits(found.entry, attempt.unkeyed):
                return await self._fetched(attempt, flight)
        else:
            try:
                # Another instance may have fetched, stored and let go of the lease between
                # our L2 read and our taking it: look again before fetching a second time.
                found = await store.leases.fetched_since(key, seen)
                if found is None or not fits(found.entry, attempt.unkeyed):
                    return await self._fetched(attempt, flight)
            finally:
                store.leases.release(key)
        flight.result = found.entry
        return said.COLLAPSED_L2, found.entry

    async def _fetched(self, attempt: Attempt, flight: Flight | None) -> Answered:
        """Fetch for a waiting client, and hand the requests waiting on `flight` what they may
        share. With a stale entry in hand, never wait for a rate-limit token: serve that."""
        try:
            outcome, answer = await self._fetch(attempt, 0.0 if attempt.stale else None)
        except UpstreamError as e:
            answer, outcome = e, said.failed(e.status, e.kind)
        if isinstance(answer, UpstreamError):
            if flight is not None:
                flight.result = answer
            return _failed(answer, attempt.stale)
        # What is not stored is shared with waiters only when they would have sent the same
        # request: nothing unkeyed went upstream. Else they fetch for themselves.
        keyed = outcome.stored or not attempt.unkeyed
        if flight is not None and isinstance(answer, CachedResponse) and keyed:
            flight.result = answer
        return outcome, answer

    async def _fetch(
        self, attempt: Attempt, wait: float | None, background: bool = False
    ) -> Answered:
        """The one fetcher (a client's miss, a background refresh, a warm start): ask the
        upstream, conditionally when we hold an entry, read, judge, store what may be stored.
        The answer is the entry, an UpstreamError when what we hold may stand in, this
        client's own response, or the response to relay (too large to store). `background`:
        no client waits (nothing is relayed), and a failure never replaces what we hold."""
        asked_at = self.deps.clock()
        headers = attempt.validated()
        async with AsyncExitStack() as exchange:
            resp = await exchange.enter_async_context(self._upstream(attempt, headers, wait))
            chunks, complete = await read_limited(resp, self.deps.config.cache.max_object_size)
            if not complete:  # the upstream exchange stays open while render streams it
                relayed = Relayed(resp, chunks, True, None if background else exchange.pop_all())
                return said.TOO_LARGE, relayed
            body = b"".join(chunks)
            # Judged before the exchange ends, which counts it a success unless told.
            api = self._api_error(resp, body, attempt.resolved)
        authorized = "Authorization" in headers
        entry, verdict = self._entry(resp, body, attempt, asked_at, authorized)
        revalidated = resp.status == 304 and attempt.previous is not None
        stand_in = background or attempt.stale is not None
        judged = judge(resp.status, verdict, api, revalidated, stand_in)
        if isinstance(judged, Stored):
            await self.deps.store.set(attempt.key, entry)
            if not background:  # a request asked for it; a refresh or warm start did not
                self.deps.store.popularity.count(attempt.key)
            return said.fetched(True, revalidated=revalidated), entry
        if isinstance(judged, Uncached):
            return said.fetched(False, judged.reason, revalidated), entry
        if isinstance(judged, Private):
            unshared = Unshared(resp.status, end_to_end(resp.headers), body)
            return said.fetched(False, judged.reason), unshared
        if isinstance(judged, Failed):
            error = UpstreamError("status", f"upstream answered {judged.status}", judged.status)
            return said.failed(judged.status, error.kind), error
        assert_never(judged)

    @asynccontextmanager
    async def _upstream(
        self, attempt: Attempt, headers: dict[str, str], wait: float | None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET (or a cached POST) the target from its upstream, conditionally when we hold an
        entry (HEAD misses fill the entry too). `wait` bounds the wait for a rate-limit token."""
        route = attempt.resolved.match.route
        upstream = self.deps.upstreams.upstream(route.upstream)
        target = upstream_target(attempt.resolved.target, upstream.query)
        method = "GET" if attempt.body is None else "POST"
        async with self.deps.upstreams.request(
            route.upstream, method, target, headers, data=attempt.body, wait=wait
        ) as resp:
            yield resp

    def _entry(
        self, resp: aiohttp.ClientResponse, body: bytes, attempt: Attempt, asked_at: float,
        authorized: bool,
    ) -> tuple[CachedResponse, DontStore | Store]:  # fmt: skip
        """The entry an upstream response makes (a 304 renews the held one), and whether it
        may be stored (`authorized`: Authorization went upstream)."""
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
            authorized=authorized, unkeyed=attempt.unkeyed,
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
            revalidate=revalidation_window(lifetime.ttl, has_validators(headers)),
        )
        return entry, verdict

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
        held = found.entry if found else None
        await self._refresh(Attempt(resolved, key, {}, previous=held), wait=None)  # may wait
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
        entry we have (what we hold stands in: judge). Requests waiting on it learn of an
        upstream failure (so stale-if-error applies to them at once); for anything else it
        could not store, they fetch for themselves. By default it never waits for a
        rate-limit token."""
        store, key = self.deps.store, attempt.key
        leased = False
        try:
            if store.leases.shared:
                leased = await store.leases.acquire(key, self.deps.config.cache.redis.lease_ttl)
                if not leased:
                    return  # another instance refreshes it; its write reaches us by backplane
            with self.deps.coalescer.lead(key) as flight:
                try:
                    outcome, answer = await self._fetch(attempt, wait, background=True)
                except UpstreamError as e:
                    outcome, answer = said.failed(e.status, e.kind), e
                if isinstance(answer, UpstreamError):
                    log.info("background refresh of %s failed: %s", key, answer)
                    flight.result = answer
                elif outcome.stored and isinstance(answer, CachedResponse):
                    flight.result = answer
        finally:
            self._refreshing.discard(key)
            if leased:
                store.leases.release(key)


def _failed(error: UpstreamError, stale: CachedResponse | None) -> Answered:
    """The upstream failed: the stale entry if it may stand in, else the error."""
    if stale is None:
        return said.failed(error.status, error.kind), error
    return said.stale_if_error(error.status), stale
