"""make_proxy_app(deps): the request pipeline.

route -> key -> L1 -> coalesce -> upstream -> decide storability -> store -> respond.
"""

from __future__ import annotations

import gzip
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy.coalesce import Flight
from proxy.deps import DEPS, Deps
from proxy.entry import CachedResponse
from proxy.errors import BadRequest, UpstreamError
from proxy.keys import Target, cache_key, parse_target, upstream_target
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
from proxy.routes import Match
from proxy.upstream import end_to_end

log = logging.getLogger(__name__)

NAME = "cacheproxy"
_CHUNK = 64 * 1024
# Reasons a response may not even be handed to concurrent waiters: it belongs to one client.
_PRIVATE_REASONS = frozenset({"set-cookie", "private", "no-store"})
# Headers never stored with an entry: recomputed per response, or per client.
_NOT_STORED = frozenset({"age", "set-cookie"})
# Request headers that would let a client steer what the upstream serves everyone.
_NEVER_FORWARDED = frozenset({"host", "x-forwarded-host", "x-original-url", "x-rewrite-url"})
_UPSTREAM_STATUS = {"timeout": 504, "connect": 502, "protocol": 502}


def json_error(
    status: int, error: str, detail: str, cache_status: str | None = None
) -> web.Response:
    """A short JSON error body; the one place errors become HTTP responses."""
    headers = {"Cache-Status": cache_status} if cache_status else None
    return web.json_response({"error": error, "detail": detail}, status=status, headers=headers)


def _accepts_gzip(request: web.Request) -> bool:
    return "gzip" in request.headers.get("Accept-Encoding", "").lower()


def _forwarded_for(request: web.Request) -> str:
    prior = request.headers.get("X-Forwarded-For")
    remote = request.remote or "unknown"
    return f"{prior}, {remote}" if prior else remote


def serve_entry(
    request: web.Request, entry: CachedResponse, cache_status: str, age: int | None
) -> web.Response:
    """Build the client response from an entry: Age, Cache-Status, gzip as the client accepts."""
    headers = CIMultiDict(entry.headers)
    body = entry.body
    if headers.get("Content-Encoding", "").lower() == "gzip" and not _accepts_gzip(request):
        try:
            body = gzip.decompress(body)
            del headers["Content-Encoding"]
        except (OSError, EOFError):
            log.warning("stored gzip body does not decompress; serving it as stored")
    if age is not None:
        headers["Age"] = str(age)
    headers["Cache-Status"] = cache_status
    return web.Response(status=entry.status, headers=headers, body=body)


class ProxyHandler:
    """The catch-all handler; reads deps.config per request so a reload takes effect."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one client request and count it by route and outcome."""
        started = time.perf_counter()
        route_name, outcome = UNMATCHED, "error"
        try:
            response, route_name, outcome = await self._handle(request)
            return response
        finally:
            self.deps.metrics.request(route_name, outcome, time.perf_counter() - started)

    async def _handle(self, request: web.Request) -> tuple[web.StreamResponse, str, str]:
        config = self.deps.config
        if request.method == "CONNECT":
            return (
                json_error(405, "method_not_allowed", "cacheproxy is not a forward proxy"),
                UNMATCHED,
                "error",
            )
        try:
            target = parse_target(request.raw_path)
        except BadRequest as e:
            return json_error(400, "bad_request", str(e)), UNMATCHED, "error"
        match = config.routes.match(request.method, target.path, target.params)
        if match is None:
            if allowed := config.routes.allowed_methods(target.path):
                response = json_error(
                    405, "method_not_allowed", f"allowed: {', '.join(sorted(allowed))}"
                )
                response.headers["Allow"] = ", ".join(sorted(allowed))
                return response, UNMATCHED, "error"
            return json_error(404, "no_route", "no route matches this request"), UNMATCHED, "error"
        route = match.route
        has_credentials = "Authorization" in request.headers or "Cookie" in request.headers
        verdict = classify_request(request.method, route.ttl_class, has_credentials, route.shared)
        try:
            if isinstance(verdict, Bypass):
                return (
                    await self._forward(request, match, target, verdict.reason),
                    route.name,
                    "bypass",
                )
            served, outcome = await self._cached(request, match, target)
            return served, route.name, outcome
        except UpstreamError as e:
            return self._upstream_error(e, route.upstream), route.name, "error"

    async def _cached(
        self, request: web.Request, match: Match, target: Target
    ) -> tuple[web.StreamResponse, str]:
        config = self.deps.config
        route = match.route
        rules = config.cache.keys
        key_headers = [
            (name, request.headers[name])
            for name in (*rules.headers, *route.key_headers)
            if name in request.headers
        ]
        key = cache_key(
            request.method, route.upstream, target, rules.ignore_params, rules.secret_params,
            key_headers,
        )  # fmt: skip
        now = self.deps.clock()
        entry = await self.deps.store.get(key)
        if entry is not None:
            verdict = freshness(entry.stored_at, entry.ttl, now)
            if isinstance(verdict, Fresh):
                status = f"{NAME}; hit; ttl={int(verdict.ttl_left)}; detail=l1"
                age = current_age(entry.initial_age, entry.stored_at, now)
                return serve_entry(request, entry, status, age), "hit_l1"
        coalescer = self.deps.coalescer
        if (future := coalescer.in_flight(key)) is not None:
            shared = await coalescer.wait(future, config.server.coalesce_timeout)
            if isinstance(shared, CachedResponse):
                status = f"{NAME}; fwd=miss; collapsed"
                return serve_entry(request, shared, status, self._miss_age(shared)), "coalesced"
            if isinstance(shared, UpstreamError):
                return self._upstream_error(shared, route.upstream), "error"
            return await self._fetch(request, match, target, key, key_headers, None), "miss"
        with coalescer.lead(key) as flight:
            try:
                return await self._fetch(request, match, target, key, key_headers, flight), "miss"
            except UpstreamError as e:
                flight.result = e
                raise

    async def _fetch(
        self,
        request: web.Request,
        match: Match,
        target: Target,
        key: str,
        key_headers: list[tuple[str, str]],
        flight: Flight | None,
    ) -> web.StreamResponse:
        """Fetch a cacheable request upstream (as GET, so HEAD can fill the entry too)."""
        config = self.deps.config
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
                return await self._relay(request, resp, [], "fwd=miss; detail=too-large")
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.content.iter_chunked(_CHUNK):
                chunks.append(chunk)
                size += len(chunk)
                if size > max_size:
                    return await self._relay(request, resp, chunks, "fwd=miss; detail=too-large")
            body = b"".join(chunks)
            now = self.deps.clock()
            verdict = storability(
                resp.status, resp.headers, "Set-Cookie" in resp.headers, len(body),
                route.ttl_class, max_size,
            )  # fmt: skip
            entry = CachedResponse(
                status=resp.status,
                headers=tuple(
                    (n, v) for n, v in end_to_end(resp.headers) if n.lower() not in _NOT_STORED
                ),
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
                    return self._private(resp, body, f"fwd=miss; detail={verdict.reason}")
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

    @staticmethod
    def _private(resp: aiohttp.ClientResponse, body: bytes, detail: str) -> web.Response:
        headers = CIMultiDict(end_to_end(resp.headers))
        headers["Cache-Status"] = f"{NAME}; {detail}"
        return web.Response(status=resp.status, headers=headers, body=body)

    async def _relay(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        prefix: list[bytes],
        detail: str,
    ) -> web.StreamResponse:
        """Stream an upstream response to the client without storing it."""
        headers = CIMultiDict(end_to_end(resp.headers))
        headers["Cache-Status"] = f"{NAME}; {detail}"
        out = web.StreamResponse(status=resp.status, headers=headers)
        if resp.content_length is not None:
            out.content_length = resp.content_length
        await out.prepare(request)
        try:
            for chunk in prefix:
                await out.write(chunk)
            async for chunk in resp.content.iter_chunked(_CHUNK):
                await out.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as e:
            # Headers are gone, so no error status can follow: abort the connection so
            # the client sees a truncated response rather than a short one that looks whole.
            raise ConnectionResetError(f"upstream {detail} broke mid-body: {e!r}") from e
        await out.write_eof()
        return out

    async def _forward(
        self, request: web.Request, match: Match, target: Target, reason: str
    ) -> web.StreamResponse:
        """Pass a request through uncached, streaming its body both ways."""
        route = match.route
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
            data = request.content.iter_chunked(_CHUNK)
        fwd = "method" if reason == "method" else "bypass"
        async with self.deps.upstreams.request(
            route.upstream, request.method, upstream_target(target, upstream.query), headers, data
        ) as resp:
            return await self._relay(request, resp, [], f"fwd={fwd}; detail={reason}")

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
        yield
        await deps.tasks.close()
        await deps.upstreams.close()

    app.cleanup_ctx.append(lifecycle)
    return app
