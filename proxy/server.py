"""ProxyApp(deps): the request pipeline's front: route, then the cached path (cached.py) or a
pass-through that streams the response back."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from proxy.accesslog import KEY, UPSTREAM_SECONDS
from proxy.accesslog import line as access_line
from proxy.accesslog import log as access_log
from proxy.attempt import Resolved
from proxy.cached import CachedPath
from proxy.config import Config
from proxy.deps import Deps
from proxy.errors import BadRequest, UpstreamError
from proxy.headers import end_to_end, forwarded_for
from proxy.keys import CacheKey, parse_target, upstream_target
from proxy.metrics import UNMATCHED
from proxy.outcome import REFUSED, Outcome, failed, passed
from proxy.policy import Bypass, classify_request
from proxy.respond import Relayed, json_error, render
from proxy.upstream import BodyBroke
from proxy.warm import bounded

log = logging.getLogger(__name__)

_SAFE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # RFC 9110 9.2.1
# Request headers that would let a client steer which host, URL or method the upstream
# serves (what it, or a cache in front of it, may then serve everyone).
_NEVER_FORWARDED = frozenset({
    "host", "forwarded", "x-forwarded-host", "x-forwarded-server", "x-forwarded-proto",
    "x-forwarded-scheme", "x-forwarded-port", "x-forwarded-prefix", "x-host", "x-original-host",
    "x-original-url", "x-rewrite-url", "x-http-method-override", "x-http-method",
    "x-method-override",
})  # fmt: skip


_MEMO_SIZE = 16384
_MEMO_TARGET = 512  # characters; bounds the memo to about 16384 * 1 KB


class ProxyHandler:
    """The catch-all handler; reads deps.config per request so a reload takes effect."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self.cached = CachedPath(deps)
        # Hot targets repeat: skip parsing, matching and key building for them. Cleared
        # when the config object changes (reload) or when it fills up.
        self._memo: dict[tuple[str, str], Resolved] = {}
        self._memo_config: Config = deps.config

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Answer one client request and count it by route and outcome."""
        started = time.perf_counter()
        route_name, outcome = UNMATCHED, REFUSED
        logging_access = self.deps.config.server.access_log
        upstream_times: list[float] = []
        if logging_access:
            UPSTREAM_SECONDS.set(upstream_times)
        status = 500
        try:
            response, route_name, outcome = await self._handle(request)
            if self.deps.closing and not response.prepared:
                response.force_close()
            status = response.status
            return response
        finally:
            elapsed = time.perf_counter() - started
            self.deps.metrics.request(route_name, outcome.label, elapsed)
            if logging_access:
                access_log.info(access_line(
                    request.method, request.path, route_name, outcome.label, status, elapsed,
                    upstream_times, request.get(KEY),
                ))  # fmt: skip

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
        key = CacheKey.of(method, route.upstream, target, rules.ignore_params, rules.secret_params)
        resolved = Resolved(match, target, key, (*rules.headers, *route.key_headers))
        if len(raw) <= _MEMO_TARGET:  # long targets are rare; memoising them costs memory
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            self._memo[(method, raw)] = resolved
        return resolved

    async def _handle(self, request: web.BaseRequest) -> tuple[web.StreamResponse, str, Outcome]:
        if request.method == "CONNECT":
            error = json_error(405, "method_not_allowed", "cacheproxy is not a forward proxy")
            return error, UNMATCHED, REFUSED
        resolved = self._resolve(request.method, request.raw_path)
        if isinstance(resolved, web.Response):
            return resolved, UNMATCHED, REFUSED
        route = resolved.match.route
        expects = request.method not in ("GET", "HEAD") and "Expect" in request.headers
        if expects and (refused := await _expect(request)) is not None:
            return refused, route.name, REFUSED
        has_credentials = "Authorization" in request.headers or "Cookie" in request.headers
        verdict = classify_request(
            request.method, route.ttl_class, has_credentials, route.shared,
            route.cache_post, request.content_length, request.headers.get("Content-Type", ""),
        )  # fmt: skip
        body: bytes | None = None
        if request.method == "POST" or (isinstance(verdict, Bypass) and request.body_exists):
            read = await read_body(request, self.deps.config.server.client_timeout)
            if isinstance(read, web.Response):
                return read, route.name, REFUSED
            body = read
        if not isinstance(verdict, Bypass):
            served, outcome = await self.cached.serve(request, resolved, body)
            return served, route.name, outcome
        outcome = passed(verdict.reason)
        try:
            forwarded = await self._forward(request, resolved, outcome, body)
        except UpstreamError as e:
            outcome = failed(e.status, e.kind)
            forwarded = await render(request, outcome, e, self.deps.clock, self.deps.closing)
        return forwarded, route.name, outcome

    async def warm_up(self) -> None:
        """Warm start: fill L1 from L2's hottest keys, then fetch the configured URLs."""
        warm, store = self.deps.config.warm, self.deps.store
        started = time.perf_counter()
        if warm.hottest and store.l1 is not None and store.remotes:
            keys = [key for key, _count in await store.popularity.hottest(warm.hottest)]

            async def fill(key: str) -> bool:
                return await store.lookup(key) is not None  # an L2 hit fills L1

            filled = await bounded(keys, warm.concurrency, fill)
            log.info("warm start: %d of L2's %d hottest keys now in L1", filled, len(keys))
        if warm.urls:

            async def fetch(url: str) -> bool:
                resolved = self._resolve("GET", url)
                if isinstance(resolved, web.Response) or resolved.match.route.ttl_class is None:
                    log.warning("warm start: %s matches no cached route", url)
                    return False
                return await self.cached.warm(resolved)

            warmed = await bounded(warm.urls, warm.concurrency, fetch)
            log.info("warm start: %d of %d URLs cached in %.1fs", warmed, len(warm.urls),
                     time.perf_counter() - started)  # fmt: skip

    async def _forward(
        self, request: web.BaseRequest, resolved: Resolved, outcome: Outcome, body: bytes | None
    ) -> web.StreamResponse:
        """Pass a request through uncached: its body as read_body() read it, the response
        streamed."""
        route, target = resolved.match.route, resolved.target
        upstream = self.deps.upstreams.upstream(route.upstream)
        headers = {
            name: value
            for name, value in end_to_end(request.headers)
            if name.lower() not in _NEVER_FORWARDED
        }
        headers["X-Forwarded-For"] = forwarded_for(
            request.headers.get("X-Forwarded-For"), request.remote
        )
        async with self.deps.upstreams.request(
            route.upstream, request.method, upstream_target(target, upstream.query), headers, body
        ) as resp:
            # A POST on a cache_post route is a query (the route says so), even when it is
            # too large or multipart to be cached: it changes nothing, so it purges nothing.
            query = request.method == "POST" and route.cache_post
            if request.method not in _SAFE and not query and resp.status < 400:
                await self._invalidate(resolved)
            # The client's own Accept-Encoding went upstream: relay the encoding as is.
            relayed = Relayed(resp, [], inflate=False, exchange=None)
            return await render(request, outcome, relayed, self.deps.clock, self.deps.closing)

    async def _invalidate(self, resolved: Resolved) -> None:
        """RFC 9111 4.4: a non-error answer to an unsafe method invalidates the target URI,
        so the next GET fetches what the change produced (every key-header variant and
        cached POST body too). A few Redis commands, however much L2 holds: the plain GET
        key is deleted, its variants are banned (lazily, as a tag purge is)."""
        store, key = self.deps.store, resolved.key
        await store.purge_key(key.get_key().text)
        if self.deps.config.makes_variants():  # each ban is a record kept for a while
            await store.banning.url(key.resource)


async def _expect(request: web.BaseRequest) -> web.Response | None:
    """RFC 9110 10.1.1: say 100 Continue before reading a body the client holds back, as
    aiohttp's router would have; refuse expectations we do not know (417)."""
    if request.headers["Expect"].lower() != "100-continue":
        return json_error(417, "expectation_failed", "only 100-continue is supported")
    if (size := request.content_length) is not None and size > request.client_max_size:
        return _too_large(request)  # RFC 9110 10.1.1: a final status instead of 100
    if request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
    return None


async def read_body(request: web.BaseRequest, seconds: float) -> bytes | web.Response:
    """The whole request body, or the answer to give instead: 413 past client_max_size
    (aiohttp's 1 MiB, as nginx's client_max_body_size), before reading any of it when
    Content-Length says so; 408 when it takes longer than `seconds`; 400 when it breaks off
    or its chunked framing is broken. Read whole before anything goes upstream, so a slow,
    vanishing or oversized upload never holds an upstream connection nor counts against the
    upstream's breaker."""
    if (size := request.content_length) is not None and size > request.client_max_size:
        return _too_large(request)
    try:
        async with asyncio.timeout(seconds):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _too_large(request)
    except TimeoutError:
        response = json_error(408, "request_timeout", f"the body took over {seconds:g}s")
    except (ConnectionError, HttpProcessingError):  # the client hung up, or broke the framing
        response = json_error(400, "bad_request", "the request body did not arrive whole")
    response.force_close()  # the rest of the body may still come: never parse it
    return response


def _too_large(request: web.BaseRequest) -> web.Response:
    limit = request.client_max_size
    return json_error(413, "payload_too_large", f"request bodies are limited to {limit} bytes")


def quiet_malformed(record: logging.LogRecord) -> bool:
    """A logging filter for aiohttp.server, for what anyone can cause as fast as they like
    and would otherwise fill the log with error-level tracebacks: a request aiohttp could
    not parse (it already got its 400) and a connection lost mid-response (the client hung
    up: debug; an upstream body broke off: one warning line, and the breaker counted it)."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, HttpProcessingError):
        log.debug("refused a malformed request: %s", error)
        return False
    if isinstance(error, BodyBroke):
        log.warning("%s", error)
        return False
    if isinstance(error, ConnectionResetError):
        log.debug("client connection lost mid-response: %s", error)
        return False
    return True


# Request-line and header-field limits (bytes) for the client-facing listener. Request bodies
# are never inflated: they go upstream as the client sent them (and a gzip bomb stays small).
MAX_LINE: Final = 8190
_SERVER_ARGS: Final[dict[str, Any]] = {
    "max_line_size": MAX_LINE, "max_field_size": MAX_LINE, "auto_decompress": False,
}  # fmt: skip


class ProxyApp:
    """The client-facing side: ProxyHandler behind aiohttp's low-level server, and the
    start and stop of what it needs (upstream sessions, backplane, background tasks).

    Every request takes the same path, so there is no router and no web.Application: the
    route table is ours (routes.py), and aiohttp's URL dispatch would only add a URL parse
    and a regex match to every hit.
    """

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self.handler = ProxyHandler(deps)

    def server(self) -> web.Server:
        """A low-level aiohttp server for a runner (web.ServerRunner) to listen with."""
        return web.Server(self.handler.handle, **self.server_args())

    def server_args(self) -> dict[str, Any]:
        """The listener's settings (for server(), and for test servers built the same way)."""
        # access_log=None: the runner's own setting does not reach a server it is handed, and
        # aiohttp's access log would otherwise write a line per request (server.access_log
        # is ours, and off by default).
        # keepalive_timeout: aiohttp arms it when a connection opens and after each response,
        # and closes a connection still without a complete request head when it fires (idle
        # keep-alive, or a slowloris trickling its head: bytes arriving do not extend it).
        return {
            **_SERVER_ARGS, "access_log": None,
            "keepalive_timeout": self.deps.config.server.client_timeout,
        }  # fmt: skip

    @asynccontextmanager
    async def running(self) -> AsyncIterator[ProxyApp]:
        """The proxy's resources, open for the block: upstream sessions and the background
        tasks start on entering (before listening); on leaving (after the listener has
        stopped), L2 writes in flight land, then tasks stop, quota counts are saved (memory
        backend), and sessions and stores close. A failure
        part-way through the start closes what was opened (aiohttp's cleanup_ctx pattern:
        there is no web.Application here to hold one)."""
        deps = self.deps
        async with AsyncExitStack() as opened:
            opened.push_async_callback(deps.store.close)
            opened.push_async_callback(deps.upstreams.close)  # also sessions opened part-way
            await deps.upstreams.start()
            if (state := deps.quota_state) is not None:
                await state.load()  # before the first call: a restart keeps the day's count
                opened.push_async_callback(state.close)  # the last counts, once tasks stopped
                state.start()
            opened.push_async_callback(deps.tasks.close)
            # Runs first: before tasks are cancelled, so no write is cut short.
            opened.push_async_callback(deps.store.flush)
            if deps.backplane is not None:
                await deps.store.banning.load()
                deps.tasks.spawn(deps.backplane.run(), "backplane")
            if deps.fleet is not None:
                deps.tasks.spawn(deps.fleet.announce(deps.store.publish), "announce")
            every = deps.config.cache.redis.popularity_flush
            if deps.store.shared.reaches_others and every > 0:
                deps.tasks.spawn(deps.store.popularity.run(every), "popularity")
            if deps.config.warm.urls or deps.config.warm.hottest:
                deps.tasks.spawn(self.handler.warm_up(), "warm-start")
            yield self
