"""One aiohttp ClientSession per upstream, with timeouts; errors mapped to UpstreamError."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import aiohttp
from aiohttp.http_parser import RawResponseMessage
from yarl import URL

from proxy.accesslog import record_upstream
from proxy.bodies import CHUNK
from proxy.breaker import CircuitBreaker
from proxy.config import Upstream
from proxy.errors import UpstreamError
from proxy.guard import UpstreamGuard
from proxy.metrics import Metrics
from proxy.quotashare import Standing
from proxy.store.base import Shared

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})  # RFC 9110 9.2.2


class BodyBroke(ConnectionResetError):
    """An upstream body broke off while it was being relayed: its headers are gone to the
    client, so no error status can follow, and the client connection is aborted. request()
    counts it against the upstream's breaker."""


def refuse_transfer_codings(resp: aiohttp.ClientResponse) -> None:
    """Refuse a response framed with a transfer coding other than chunked (RFC 9112 6.1):
    `Transfer-Encoding: gzip, chunked` leaves the body gzip once aiohttp has undone chunked,
    with nothing left to say so (Transfer-Encoding is hop-by-hop). We never send TE, so no
    upstream may use another coding (RFC 9112 7.4): a broken response, a protocol error."""
    codings = [
        token.strip().lower()
        for value in resp.headers.getall("Transfer-Encoding", ())
        for token in value.split(",")
        if token.strip()
    ]
    if codings and codings != ["chunked"]:
        raise aiohttp.ClientResponseError(
            resp.request_info, resp.history, status=resp.status,
            message=f"unsupported transfer coding: {', '.join(codings)}",
        )  # fmt: skip


async def read_limited(resp: aiohttp.ClientResponse, limit: int) -> tuple[list[bytes], bool]:
    """The body's chunks, and whether that is all of it (False: over `limit`, stop reading).
    A body in a transfer coding other than chunked is refused, never read."""
    refuse_transfer_codings(resp)
    if resp.content_length is not None and resp.content_length > limit:
        return [], False
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(CHUNK):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return chunks, False
    return chunks, True


def _guard_settings(u: Upstream) -> tuple[object, ...]:
    return (
        u.rate_limit, u.quota_reset, u.quota_headers, u.breaker_failures, u.breaker_backoff,
        u.breaker_max_backoff,
    )  # fmt: skip


class UpstreamPool:
    """Sessions for every configured upstream, opened and closed with the app."""

    def __init__(
        self,
        upstreams: Mapping[str, Upstream],
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        wall: Callable[[], float] = time.time,
        shared: Shared | None = None,
        shared_clock: Callable[[], float] | None = None,
        live: Callable[[], int] = lambda: 1,
        resume_grace: float = 0.0,
    ) -> None:
        """`clock` times sliding windows, pauses and breakers; `wall` day windows; `shared`
        counts quotas for the fleet (by `shared_clock`, None: its own; see UpstreamGuard),
        `live` says how many instances share them when it cannot be reached."""
        self.upstreams = dict(upstreams)
        self.metrics = metrics
        self._clock = clock
        self._wall = wall
        self._shared = shared
        self._shared_clock = shared_clock
        self._live = live
        self._resume_grace = resume_grace
        self.guards = {name: self._guard(u) for name, u in upstreams.items()}
        self._rng = rng or random.Random()
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._judged: set[int] = set()  # id() of calls a caller judged failures (API errors)
        # Upstreams a reload removed, until their sessions close: in-flight work finishes.
        self._retired: dict[str, tuple[Upstream, aiohttp.ClientSession, UpstreamGuard]] = {}

    def _guard(self, u: Upstream) -> UpstreamGuard:
        breaker = CircuitBreaker(
            u.breaker_failures, u.breaker_backoff, u.breaker_max_backoff, self._clock
        )
        return UpstreamGuard(
            u.name, u.rate_limit, breaker, self._clock, u.quota_reset, self._wall, self._shared,
            self._shared_clock, self._live, self._resume_grace, u.quota_headers,
        )  # fmt: skip

    def quota_usage(self) -> Iterator[tuple[str, str, float, int]]:
        """(upstream, window label, limit, calls counted) for every configured window."""
        for name, guard in self.guards.items():
            for window, used in guard.usage():
                yield name, window.label, window.count, used

    def quota_standing(self) -> Iterator[tuple[str, Standing]]:
        """(upstream, how its quota is counted) for every upstream with a shared quota."""
        for name, guard in self.guards.items():
            if (standing := guard.standing()) is not None:
                yield name, standing

    def update(self, upstreams: Mapping[str, Upstream]) -> list[aiohttp.ClientSession]:
        """Switch to a reloaded set of upstreams. New or changed ones get new sessions; an
        unchanged guard is kept (a 429 pause survives a reload). Returns the sessions taken
        out of use, for the caller to close once requests still on them are done."""
        retired: list[aiohttp.ClientSession] = []
        for name, old in self.upstreams.items():
            if upstreams.get(name) != old and name in self._sessions:
                session = self._sessions.pop(name)
                retired.append(session)
                if name not in upstreams:  # requests resolved before the reload still use it
                    self._retired[name] = (old, session, self.guards[name])
        for name, new in upstreams.items():
            old_upstream = self.upstreams.get(name)
            if name not in self._sessions:
                self._sessions[name] = self._open(new)
            if old_upstream is None or _guard_settings(old_upstream) != _guard_settings(new):
                guard = self._guard(new)
                if (previous := self.guards.get(name)) is not None:
                    guard.quota.adopt(previous.quota)  # what was spent stays spent
                    guard.paused_until = previous.paused_until
                self.guards[name] = guard
        for name in set(self.guards) - set(upstreams):
            del self.guards[name]
        self.upstreams = dict(upstreams)
        return retired

    async def start(self) -> None:
        """Open one session per upstream."""
        for name, upstream in self.upstreams.items():
            self._sessions[name] = self._open(upstream)

    def _open(self, upstream: Upstream) -> aiohttp.ClientSession:
        idle = upstream.idle_timeout
        connector = aiohttp.TCPConnector(
            limit=upstream.max_connections, ttl_dns_cache=300,
            keepalive_timeout=idle if idle > 0 else None, force_close=idle <= 0,
        )  # fmt: skip
        session = aiohttp.ClientSession(
            connector=connector,
            trace_configs=[_reuse_trace()],  # tells _send which connections were reused
            timeout=aiohttp.ClientTimeout(
                total=upstream.timeout, sock_connect=upstream.connect_timeout
            ),
            auto_decompress=False,  # store and relay bytes exactly as the upstream sent them
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            cookie_jar=aiohttp.DummyCookieJar(),  # never carry one client's cookies to another
        )
        # aiohttp silently resends an idempotent request once when a connection, kept-alive
        # or new, turns out closed; _send does that itself, for reused connections only.
        session._retry_connection = False
        return session

    def upstream(self, name: str) -> Upstream:
        """An upstream by name, including one a reload removed moments ago."""
        if (upstream := self.upstreams.get(name)) is not None:
            return upstream
        return self._retired[name][0]

    def guard(self, name: str) -> UpstreamGuard:
        """An upstream's guard, including a just-removed upstream's."""
        if (guard := self.guards.get(name)) is not None:
            return guard
        return self._retired[name][2]

    def forget(self, sessions: list[aiohttp.ClientSession]) -> None:
        """Drop retired upstreams whose sessions are now closed."""
        for name in [n for n, (_, s, _) in self._retired.items() if s in sessions]:
            del self._retired[name]

    async def close(self) -> None:
        """Close every session."""
        sessions, self._sessions = self._sessions, {}
        retired, self._retired = self._retired, {}
        await asyncio.gather(
            *(s.close() for s in sessions.values()),
            *(session.close() for _, session, _ in retired.values()),
        )

    @asynccontextmanager
    async def request(
        self,
        upstream_name: str,
        method: str,
        target: str,
        headers: Mapping[str, str],
        data: Any = None,
        wait: float | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send one request through the upstream's guard; yields the response, body unread.

        `wait`: how long to wait for a rate-limit token (default: the upstream's
        rate_limit_wait; 0 when the caller has something stale to serve instead).
        Timeouts become UpstreamError("timeout"), refused connections "connect", broken
        responses "protocol"; the guard's refusals "rate-limited" or "unavailable".
        """
        upstream = self.upstream(upstream_name)
        guard = self.guard(upstream_name)
        delay = await guard.admit(upstream.rate_limit_wait if wait is None else wait)
        if delay > 0:
            await asyncio.sleep(delay)
            guard.recheck()  # a 429 pause or an open breaker may have come while we queued
        response = await self._send(upstream, guard, method, target, headers, data)
        try:
            yield response
        except BodyBroke:
            self.metrics.upstream_error(upstream_name, "protocol", answered=True)
            guard.failed("protocol")
            raise
        except TimeoutError as e:
            self.metrics.upstream_error(upstream_name, "timeout", answered=True)
            guard.failed("timeout")
            raise UpstreamError("timeout", f"upstream {upstream_name} timed out") from e
        except (aiohttp.ClientError, ValueError) as e:
            self.metrics.upstream_error(upstream_name, "protocol", answered=True)
            guard.failed("protocol")
            raise UpstreamError(
                "protocol", f"upstream {upstream_name} sent a broken response"
            ) from e
        else:
            # Only now, body and all: a 200 whose body then broke must not count as a success,
            # or an upstream that always breaks mid-body never opens its breaker.
            if id(response) not in self._judged:
                retry_after = response.headers.get("Retry-After")
                await guard.answered(response.status, retry_after, response.headers)
        finally:
            self._judged.discard(id(response))
            response.release()

    def failed(self, upstream_name: str, response: aiohttp.ClientResponse, kind: str) -> None:
        """A caller judged this answer a failure (an API error body): counted against the
        upstream's breaker, and not as a success when its request() block ends."""
        self._judged.add(id(response))
        self.guard(upstream_name).failed(kind)

    async def _send(
        self,
        upstream: Upstream,
        guard: UpstreamGuard,
        method: str,
        target: str,
        headers: Mapping[str, str],
        data: Any,
    ) -> aiohttp.ClientResponse:
        """Send and wait for the response headers, retrying connection errors when safe."""
        name = upstream.name
        url = URL(str(upstream.url).rstrip("/") + target, encoded=True)
        sent = dict(headers)
        sent.update(upstream.headers)  # configured headers always win
        # Only a request that can be repeated safely, and only when no body was consumed.
        attempts = 1 + (upstream.retries if method in _IDEMPOTENT and data is None else 0)
        attempt = 0
        resend = isinstance(data, bytes | None)  # a body we hold whole can go again
        while True:
            started = time.perf_counter()
            connection = _Connection()
            try:
                session = self._sessions.get(name) or self._retired[name][1]
                try:
                    response = await session.request(
                        method, url, headers=sent, data=data, allow_redirects=False,
                        trace_request_ctx=connection,
                    )  # fmt: skip
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
                    if not (resend and connection.reused and _unanswered(e)):
                        raise
                    # RFC 9112 9.3.1: the upstream closed a connection it had kept idle as
                    # our request crossed it, and sent nothing back: send it once more, on
                    # another connection, whatever the method. Not a failure of the
                    # upstream, and no rate-limit token: it (most likely) never saw it.
                    self.metrics.upstream_error(name, "closed-idle")
                    resend = False
                    continue
            except TimeoutError as e:  # not retried: the upstream may be doing the work
                self.metrics.upstream_error(name, "timeout")
                guard.failed("timeout")
                raise UpstreamError("timeout", f"upstream {name} timed out") from e
            except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as e:
                self.metrics.upstream_error(name, "connect")
                if attempt + 1 < attempts:
                    # Jittered exponential backoff, so retries from many requests spread out.
                    await asyncio.sleep(0.05 * 2**attempt * self._rng.uniform(0.5, 1.5))
                    await guard.admit(0.0)  # a retry is a call too: it needs a token of its own
                    attempt += 1
                    continue
                guard.failed("connect")
                raise UpstreamError("connect", f"cannot connect to upstream {name}") from e
            except (aiohttp.ClientError, ValueError) as e:
                self.metrics.upstream_error(name, "protocol")
                guard.failed("protocol")
                raise UpstreamError("protocol", f"upstream {name} sent a broken response") from e
            elapsed = time.perf_counter() - started
            self.metrics.upstream_call(name, response.status, elapsed)
            record_upstream(elapsed)
            return response  # request() tells the guard once the body is in


@dataclass(slots=True)
class _Connection:
    """What aiohttp's tracing tells about the connection one attempt was sent on."""

    reused: bool = False  # taken from the pool, kept alive since an earlier request


async def _on_reuse(
    session: aiohttp.ClientSession,
    context: SimpleNamespace,
    params: aiohttp.TraceConnectionReuseconnParams,
) -> None:
    if isinstance(connection := context.trace_request_ctx, _Connection):
        connection.reused = True


def _reuse_trace() -> aiohttp.TraceConfig:
    """Marks the _Connection passed as trace_request_ctx when the pool hands out a kept-alive
    connection (aiohttp's own signal for it)."""
    trace = aiohttp.TraceConfig()
    trace.on_connection_reuseconn.append(_on_reuse)
    return trace


def _unanswered(error: aiohttp.ClientError) -> bool:
    """Whether the connection closed before any byte of a response: a reset, or a clean close
    before a status line began (after one, aiohttp hands over the message it parsed)."""
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return not isinstance(error.message, RawResponseMessage)
    return not isinstance(error, aiohttp.ClientConnectorError)  # that one never connected
