"""make_proxy_app(deps): the request pipeline.

route -> key -> L1 -> coalesce -> upstream -> decide storability -> store -> respond.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDictProxy

from proxy.coalesce import Flight
from proxy.config import Config
from proxy.deps import DEPS, Deps
from proxy.entry import CachedResponse
from proxy.errors import BadRequest, UpstreamError
from proxy.keys import Target, cache_key, header_suffix, parse_target, upstream_target
from proxy.metrics import UNMATCHED
from proxy.policy import (
    Bypass,
    DontStore,
    Fresh,
    classify_request,
    current_age,
    freshness,
    parse_age,
    storability,
)
from proxy.respond import CHUNK, NAME, json_error, private_response, relay, serve_entry
from proxy.routes import Match
from proxy.upstream import end_to_end

log = logging.getLogger(__name__)

# Reasons a response may not even be handed to concurrent waiters: it belongs to one client.
_PRIVATE_REASONS = frozenset({"set-cookie", "private", "no-store"})
# Headers never stored with an entry: recomputed per response, or per client.
_NOT_STORED = frozenset({"age", "set-cookie"})
# Request headers that would let a client steer what the upstream serves everyone.
_NEVER_FORWARDED = frozenset({"host", "x-forwarded-host", "x-original-url", "x-rewrite-url"})
_UPSTREAM_STATUS = {"timeout": 504, "connect": 502, "protocol": 502}


def _forwarded_for(request: web.Request) -> str:
    prior = request.headers.get("X-Forwarded-For")
    remote = request.remote or "unknown"
    return f"{prior}, {remote}" if prior else remote


def _joined(headers: CIMultiDictProxy[str], *names: str) -> dict[str, str]:
    """Fields that may come as several lines, each folded into one value (RFC 9110 5.3)."""
    return {name: ", ".join(headers.getall(name, ())) for name in names}


@dataclass(frozen=True, slots=True)
class Resolved:
    """A request target resolved against the routes; memoised per (method, raw target)."""

    match: Match
    target: Target
    key: str  # the cache key without its header part
    key_headers: tuple[str, ...]  # request headers that complete the key


_MEMO_SIZE = 16384
_MEMO_TARGET = 512  # characters; bounds the memo to about 16384 * 1 KB


def _stored_headers(headers: CIMultiDictProxy[str]) -> tuple[tuple[str, str], ...]:
    """End-to-end headers worth keeping; a gzip entry varies on Accept-Encoding."""
    kept = [(n, v) for n, v in end_to_end(headers) if n.lower() not in _NOT_STORED]
    gzipped = headers.get("Content-Encoding", "").strip().lower() == "gzip"
    vary = ", ".join(headers.getall("Vary", ())).lower()
    if gzipped and "accept-encoding" not in vary:
        kept.append(("Vary", "Accept-Encoding"))
    return tuple(kept)


class ProxyHandler:
    """The catch-all handler; reads deps.config per request so a reload takes effect."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        # Hot targets repeat: skip parsing, matching and key building for them. Cleared
        # when the config object changes (reload) or when it fills up.
        self._memo: dict[tuple[str, str], Resolved] = {}
        self._memo_config: Config = deps.config

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one client request and count it by route and outcome."""
        started = time.perf_counter()
        route_name, outcome = UNMATCHED, "error"
        try:
            response, route_name, outcome = await self._handle(request)
            return response
        finally:
            self.deps.metrics.request(route_name, outcome, time.perf_counter() - started)

    def _resolve(self, method: str, raw: str) -> Resolved | web.Response:
        """Route and key for a target, or the error response when there is none."""
        config = self.deps.config
        if config is not self._memo_config:
            self._memo.clear()
            self._memo_config = config
        if (resolved := self._memo.get((method, raw))) is not None:
            return resolved
        try:
            target = parse_target(raw)
        except BadRequest as e:
            return json_error(400, "bad_request", str(e))
        match = config.routes.match(method, target.path, target.params)
        if match is None:
            if allowed := config.routes.allowed_methods(target.path):
                methods = ", ".join(sorted(allowed))
                response = json_error(405, "method_not_allowed", f"allowed: {methods}")
                response.headers["Allow"] = methods
                return response
            return json_error(404, "no_route", "no route matches this request")
        rules = config.cache.keys
        route = match.route
        key = cache_key(method, route.upstream, target, rules.ignore_params, rules.secret_params)
        resolved = Resolved(match, target, key, (*rules.headers, *route.key_headers))
        if len(raw) <= _MEMO_TARGET:  # long targets are rare; memoising them costs memory
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            self._memo[(method, raw)] = resolved
        return resolved

    async def _handle(self, request: web.Request) -> tuple[web.StreamResponse, str, str]:
        if request.method == "CONNECT":
            error = json_error(405, "method_not_allowed", "cacheproxy is not a forward proxy")
            return error, UNMATCHED, "error"
        resolved = self._resolve(request.method, request.raw_path)
        if isinstance(resolved, web.Response):
            return resolved, UNMATCHED, "error"
        route = resolved.match.route
        has_credentials = "Authorization" in request.headers or "Cookie" in request.headers
        verdict = classify_request(request.method, route.ttl_class, has_credentials, route.shared)
        try:
            if isinstance(verdict, Bypass):
                forwarded = await self._forward(request, resolved, verdict.reason)
                return forwarded, route.name, "bypass"
            served, outcome = await self._cached(request, resolved)
            return served, route.name, outcome
        except UpstreamError as e:
            return self._upstream_error(e, route.upstream), route.name, "error"

    async def _cached(
        self, request: web.Request, resolved: Resolved
    ) -> tuple[web.StreamResponse, str]:
        key_headers = [
            (name, request.headers[name])
            for name in resolved.key_headers
            if name in request.headers
        ]
        key = resolved.key + header_suffix(key_headers) if key_headers else resolved.key
        store = self.deps.store
        found = await store.lookup(key)
        store.count_request(key)
        if found is not None:
            now = self.deps.clock()
            entry = found.entry
            verdict = freshness(entry.stored_at, entry.ttl, now)
            if isinstance(verdict, Fresh):
                status = f"{NAME}; hit; ttl={int(verdict.ttl_left)}; detail={found.layer}"
                age = current_age(entry.initial_age, entry.stored_at, now)
                return serve_entry(request, entry, status, age), f"hit_{found.layer}"
        coalescer = self.deps.coalescer
        upstream = resolved.match.route.upstream
        if (future := coalescer.in_flight(key)) is not None:
            shared = await coalescer.wait(future, self.deps.config.server.coalesce_timeout)
            if isinstance(shared, CachedResponse):
                status = f"{NAME}; fwd=miss; collapsed"
                return serve_entry(request, shared, status, self._miss_age(shared)), "coalesced"
            if isinstance(shared, UpstreamError):
                return self._upstream_error(shared, upstream), "error"
            return await self._fetch(request, resolved, key, key_headers, None), "miss"
        with coalescer.lead(key) as flight:
            try:
                return await self._lead(request, resolved, key, key_headers, flight)
            except UpstreamError as e:
                flight.result = e
                raise

    async def _lead(
        self,
        request: web.Request,
        resolved: Resolved,
        key: str,
        key_headers: list[tuple[str, str]],
        flight: Flight,
    ) -> tuple[web.StreamResponse, str]:
        """This instance's one fetch of key, first asking other instances (a Redis lease)."""
        store = self.deps.store
        if store.l2 is None:
            return await self._fetch(request, resolved, key, key_headers, flight), "miss"
        redis = self.deps.config.cache.redis
        if not await store.acquire_lease(key, redis.lease_ttl):
            # Another instance is fetching it: wait (bounded) for its answer to reach L2.
            found = await store.wait_for_l2(key, redis.lease_wait)
            if found is not None:
                flight.result = found.entry
                status = f"{NAME}; fwd=miss; collapsed; detail=l2"
                return serve_entry(request, found.entry, status, self._miss_age(found.entry)), (
                    "coalesced"
                )
            return await self._fetch(request, resolved, key, key_headers, flight), "miss"
        try:
            return await self._fetch(request, resolved, key, key_headers, flight), "miss"
        finally:
            store.release_lease(key)

    async def _fetch(
        self,
        request: web.Request,
        resolved: Resolved,
        key: str,
        key_headers: list[tuple[str, str]],
        flight: Flight | None,
    ) -> web.StreamResponse:
        """Fetch a cacheable request upstream (as GET, so HEAD can fill the entry too)."""
        config = self.deps.config
        match, target = resolved.match, resolved.target
        route = match.route
        assert route.ttl_class is not None
        upstream = config.upstreams[route.upstream]
        headers = {name: value for name, value in key_headers}
        headers["Accept-Encoding"] = "gzip"
        headers["X-Forwarded-For"] = _forwarded_for(request)
        if route.shared:
            for name in ("Authorization", "Cookie"):
                if name in request.headers:
                    headers[name] = request.headers[name]
        max_size = config.cache.max_object_size
        async with self.deps.upstreams.request(
            route.upstream, "GET", upstream_target(target, upstream.query), headers
        ) as resp:
            if resp.content_length is not None and resp.content_length > max_size:
                return await relay(request, resp, [], "fwd=miss; detail=too-large", True)
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.content.iter_chunked(CHUNK):
                chunks.append(chunk)
                size += len(chunk)
                if size > max_size:
                    return await relay(request, resp, chunks, "fwd=miss; detail=too-large", True)
            body = b"".join(chunks)
            now = self.deps.clock()
            verdict = storability(
                resp.status, _joined(resp.headers, "Cache-Control", "Vary"),
                "Set-Cookie" in resp.headers, len(body), route.ttl_class, max_size,
            )  # fmt: skip
            entry = CachedResponse(
                status=resp.status,
                headers=_stored_headers(resp.headers),
                body=body,
                stored_at=now,
                ttl=0.0 if isinstance(verdict, DontStore) else verdict.ttl,
                initial_age=parse_age(resp.headers.get("Age")),
                route=route.name,
                tags=tuple(f"{k}={v}" for k, v in match.params.items()),
            )
            if isinstance(verdict, DontStore):
                if verdict.reason in _PRIVATE_REASONS:
                    # Relay this client's own response untouched (Set-Cookie included).
                    return private_response(
                        request, resp, body, f"fwd=miss; detail={verdict.reason}"
                    )
                status = f"{NAME}; fwd=miss; detail={verdict.reason}"
            else:
                await self.deps.store.set(key, entry)
                status = f"{NAME}; fwd=miss; stored"
            if flight is not None:
                flight.result = entry
            return serve_entry(request, entry, status, self._miss_age(entry))

    @staticmethod
    def _miss_age(entry: CachedResponse) -> int | None:
        # RFC 9111 5.1: Age says the response was not generated by the origin just now;
        # on a miss we only relay what the upstream itself reported.
        return int(entry.initial_age) if entry.initial_age else None

    async def _forward(
        self, request: web.Request, resolved: Resolved, reason: str
    ) -> web.StreamResponse:
        """Pass a request through uncached, streaming its body both ways."""
        route, target = resolved.match.route, resolved.target
        upstream = self.deps.config.upstreams[route.upstream]
        headers = {
            name: value
            for name, value in end_to_end(request.headers)
            if name.lower() not in _NEVER_FORWARDED
        }
        headers["X-Forwarded-For"] = _forwarded_for(request)
        data: AsyncIterator[bytes] | None = None
        if request.body_exists:
            if request.content_length is not None:
                headers["Content-Length"] = str(request.content_length)
            data = request.content.iter_chunked(CHUNK)
        fwd = "method" if reason == "method" else "bypass"
        async with self.deps.upstreams.request(
            route.upstream, request.method, upstream_target(target, upstream.query), headers, data
        ) as resp:
            # The client's own Accept-Encoding went upstream: relay the encoding as is.
            return await relay(request, resp, [], f"fwd={fwd}; detail={reason}", False)

    def _upstream_error(self, error: UpstreamError, upstream: str) -> web.Response:
        status = _UPSTREAM_STATUS.get(error.kind, 502)
        return json_error(
            status,
            f"upstream_{error.kind}",
            str(error),
            f"{NAME}; fwd=miss; fwd-status={status}; detail=upstream-{error.kind}",
        )


def make_proxy_app(deps: Deps) -> web.Application:
    """The client-facing application: every path goes through ProxyHandler."""
    app = web.Application(handler_args={"max_line_size": 8190, "max_field_size": 8190})
    app[DEPS] = deps
    app.router.add_route("*", "/{tail:.*}", ProxyHandler(deps).handle)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await deps.upstreams.start()
        if deps.backplane is not None:
            deps.tasks.spawn(deps.backplane.run(), "backplane")
        every = deps.config.cache.redis.popularity_flush
        if deps.store.l2 is not None and every > 0:
            deps.tasks.spawn(deps.store.run_popularity(every), "popularity")
        yield
        await deps.tasks.close()
        await deps.upstreams.close()
        await deps.store.close()

    app.cleanup_ctx.append(lifecycle)
    return app
