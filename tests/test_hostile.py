"""Hostile requests (issue 7, item 2): malformed and oversized requests, smuggling shapes,
absolute-form and CONNECT, traversal, slow clients and huge bodies. Each gets its exact answer
(or a closed connection) over a raw socket to a real listening proxy, the upstream receives
nothing it should not, and a well-behaved client on another connection is served meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from conftest import CountingUpstream, Proxy, ProxyFactory, Reply, base_config, eventually

from proxy.config import parse_config
from proxy.errors import ConfigError
from proxy.server import ProxyApp, quiet_malformed
from proxy.upstream import BodyBroke

BOUND = 10.0  # seconds any single network step may take before the test fails
SMUGGLED = b"GET /quote/SMUGGLED HTTP/1.1\r\nHost: x\r\n\r\n"
FOLLOW = b"GET /quote/FOLLOW HTTP/1.1\r\nHost: x\r\n\r\n"
GOOD = "/quote/GOOD"
CONTROL_PATHS = {GOOD, "/quote/FOLLOW"}  # what the test itself asks for


@dataclass
class Answer:
    """One HTTP response as read off a raw socket."""

    status: int
    headers: dict[str, str]
    body: bytes


async def read_answer(reader: asyncio.StreamReader) -> Answer | None:
    """The next response on the connection, or None when it closes before one starts."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND)
    except asyncio.IncompleteReadError as e:
        assert not e.partial, f"truncated response head: {e.partial!r}"
        return None
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), BOUND)
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            body += await reader.readexactly(size + 2)
            body = body[:-2]
        await reader.readuntil(b"\r\n")
    else:
        body = await asyncio.wait_for(reader.read(), BOUND)
    return Answer(status, headers, body)


async def closed(reader: asyncio.StreamReader) -> bool:
    """Whether the server closes the connection (waits at most BOUND for it to)."""
    with contextlib.suppress(ConnectionError):
        return await asyncio.wait_for(reader.read(1), BOUND) == b""
    return True


@dataclass
class Listening:
    """A proxy behind its real listener (ProxyApp.server(), as cli.py builds it)."""

    proxy: Proxy
    port: int
    session: aiohttp.ClientSession
    server: web.Server

    async def get(self, path: str, **kwargs: Any) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{self.port}{path}"
        async with self.session.get(url, **kwargs) as response:
            return response.status, await response.read()


@pytest.fixture
async def listen(make_proxy: ProxyFactory) -> AsyncIterator[Callable[..., Awaitable[Listening]]]:
    runners: list[web.BaseRunner] = []
    sessions: list[aiohttp.ClientSession] = []

    async def factory(**overrides: Any) -> Listening:
        proxy = await make_proxy(**overrides)
        server = ProxyApp(proxy.deps).server()
        runner = web.ServerRunner(server)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        sessions.append(aiohttp.ClientSession())
        return Listening(proxy, port, sessions[-1], server)

    yield factory
    for session in sessions:
        await session.close()
    for runner in runners:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def connection(
    port: int,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def assert_served(proxy: Listening) -> None:
    """A well-behaved client on a connection of its own gets its answer."""
    assert await asyncio.wait_for(proxy.get(GOOD), BOUND) == (200, b"good")


def hostile_calls(upstream: CountingUpstream) -> list[str]:
    return [seen.path_qs for seen in upstream.seen if seen.path_qs not in CONTROL_PATHS]


@pytest.fixture
async def armed(
    listen: Callable[..., Awaitable[Listening]], upstream: CountingUpstream
) -> Listening:
    """A listening proxy, and an upstream whose answers say which path they answer, so a
    response can never pass for another."""
    upstream.replies.update(
        {
            GOOD: Reply(body=b"good"),
            "/quote/FOLLOW": Reply(body=b"follow"),
            "/quote/SMUGGLED": Reply(body=b"smuggled"),
            "/xhr/ncp": Reply(body=b"<echo>"),
        }
    )
    return await listen()


@dataclass(frozen=True)
class Shape:
    """A hostile request and what must come of it.

    `after`: "closed" (the server closes the connection) or "open" (a request that follows on
    the same connection is answered, and answered as itself).
    """

    id: str
    raw: bytes
    status: int | None  # None: closed without any answer
    after: str = "closed"
    error: str | None = None  # the proxy's own JSON error code, when it answers itself
    upstream: tuple[str, ...] = ()  # path_qs the upstream receives (nothing by default)
    upstream_bodies: tuple[bytes, ...] = field(default=())


def get(target: bytes, *headers: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    return b"\r\n".join([b"GET " + target + b" " + version, b"Host: x", *headers, b"", b""])


def post(*headers: bytes, body: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    head = [b"POST /xhr/ncp " + version, b"Host: x", *headers, b"", b""]
    return b"\r\n".join(head) + body


def many(count: int, size: int) -> list[bytes]:
    return [b"X-H%d: %s" % (i, b"v" * size) for i in range(count)]


CHUNKED = b"Transfer-Encoding: chunked"
# aiohttp's parser (llhttp) answers each of these with a bare 400 and closes the connection.
MALFORMED = [
    Shape("no-version", b"GARBAGE\r\n\r\n", 400),
    Shape("lowercase-method", b"get /quote/AAPL HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    Shape("unknown-method", b"FOO /quote/AAPL HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    Shape("nul-in-method", b"G\x00T /quote/AAPL HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    Shape("space-in-target", get(b"/quote/AA PL"), 400),
    Shape("raw-byte-in-target", get(b"/quote/\xff"), 400),
    Shape("bare-lf-lines", b"GET /quote/AAPL HTTP/1.1\nHost: x\n\n", 400),
    Shape("unknown-version", get(b"/quote/AAPL", version=b"HTTP/9.9"), 400),
    Shape("tls-client-hello", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\0" * 40, 400),
    Shape("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    Shape("header-without-colon", get(b"/quote/AAPL", b"X-A 1"), 400),
    Shape("space-before-colon", get(b"/quote/AAPL", b"X-A : 1"), 400),
    Shape("obs-fold", get(b"/quote/AAPL", b"X-A: 1", b"  folded"), 400),
    Shape("nul-in-value", get(b"/quote/AAPL", b"X-A: a\x00b"), 400),
    Shape("bare-cr-in-value", get(b"/quote/AAPL", b"X-A: a\rSet-Cookie: x"), 400),
    Shape("bare-lf-in-value", get(b"/quote/AAPL", b"X-A: a\nSet-Cookie: x"), 400),
    Shape("space-in-name", get(b"/quote/AAPL", b"X A: 1"), 400),
    Shape("control-in-name", get(b"/quote/AAPL", b"X-A\x01: 1"), 400),
    Shape("missing-host", b"GET /quote/AAPL HTTP/1.1\r\n\r\n", 400),
    Shape("two-hosts", b"GET /quote/AAPL HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    # Oversized: 8190 bytes per line (request line or one header), at most 128 headers.
    Shape("url-over-8190", get(b"/quote/" + b"A" * 9000), 400),
    Shape("header-over-8190", get(b"/quote/AAPL", b"X-Big: " + b"a" * 9000), 400),
    Shape("name-over-8190", get(b"/quote/AAPL", b"X" * 9000 + b": 1"), 400),
    Shape("200-headers", get(b"/quote/AAPL", *many(200, 1)), 400),
]
# Request smuggling: every ambiguous framing is refused before anything goes upstream, and
# the request hidden in the body never reaches the upstream as a request of its own.
SMUGGLING = [
    Shape("cl-then-te", post(b"Content-Length: 4", CHUNKED, body=b"0\r\n\r\n" + SMUGGLED), 400),
    Shape("te-then-cl", post(CHUNKED, b"Content-Length: 4", body=b"0\r\n\r\n" + SMUGGLED), 400),
    Shape("two-equal-cl", post(b"Content-Length: 5", b"Content-Length: 5", body=b"hello"), 400),
    Shape("two-cl", post(b"Content-Length: 0", b"Content-Length: 41", body=SMUGGLED), 400),
    Shape("cl-list", post(b"Content-Length: 0, 41", body=SMUGGLED), 400),
    Shape("cl-plus-sign", post(b"Content-Length: +41", body=SMUGGLED), 400),
    Shape("cl-negative", post(b"Content-Length: -1", body=SMUGGLED), 400),
    Shape("cl-hex", post(b"Content-Length: 0x2c", body=SMUGGLED), 400),
    Shape("cl-overflow", post(b"Content-Length: 99999999999999999999999", body=SMUGGLED), 400),
    Shape(
        "te-chunked-identity",
        post(b"Transfer-Encoding: chunked, identity", body=b"0\r\n\r\n" + SMUGGLED),
        400,
    ),
    Shape("te-unknown", post(b"Transfer-Encoding: xchunked", body=b"0\r\n\r\n" + SMUGGLED), 400),
    Shape("te-twice", post(CHUNKED, b"Transfer-Encoding: identity", body=b"0\r\n\r\n"), 400),
    Shape("te-space-before-colon", post(b"Transfer-Encoding : chunked", body=b"0\r\n\r\n"), 400),
    Shape("te-folded", post(b"Transfer-Encoding:", b" chunked", body=b"0\r\n\r\n"), 400),
    Shape("te-vertical-tab", post(b"Transfer-Encoding: \x0bchunked", body=b"0\r\n\r\n"), 400),
    Shape("chunk-size-overflow", post(CHUNKED, body=b"fffffffffffffffffff\r\nx\r\n0\r\n\r\n"), 400),
    Shape("chunk-size-not-hex", post(CHUNKED, body=b"zz\r\nhello\r\n0\r\n\r\n"), 400),
    Shape("chunk-ext-bare-lf", post(CHUNKED, body=b"5;a\nb\r\nhello\r\n0\r\n\r\n"), 400),
    Shape("chunk-missing-crlf", post(CHUNKED, body=b"5\r\nhelloXX0\r\n\r\n" + SMUGGLED), 400),
    # After a request that says Connection: close (HTTP/1.0 by default), nothing more is read.
    Shape(
        "te-in-http-1.0-then-more",
        post(CHUNKED, version=b"HTTP/1.0", body=b"0\r\n\r\n" + SMUGGLED),
        400,
    ),
    Shape("data-after-close", get(b"/quote/C", b"Connection: close") + SMUGGLED, 400),
]
ACCESS = [
    # Never an open proxy: absolute-form, authority-form and CONNECT.
    Shape("absolute-form", get(b"http://evil.example/quote/AAPL"), 400, "open", "bad_request"),
    Shape(
        "absolute-https", get(b"https://evil.example:443/quote/AAPL"), 400, "open", "bad_request"
    ),
    Shape("authority-form-get", get(b"evil.example:80"), 400),
    Shape("scheme-relative", get(b"//evil.example/quote/AAPL"), 400, "open", "bad_request"),
    Shape(
        "connect-authority",
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
        405,
        "open",
        "method_not_allowed",
    ),
    Shape(
        "connect-origin-form",
        b"CONNECT /quote/AAPL HTTP/1.1\r\nHost: x\r\n\r\n",
        405,
        "open",
        "method_not_allowed",
    ),
    Shape("asterisk-form", b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 400, "open", "bad_request"),
    Shape(
        "trace", b"TRACE /quote/AAPL HTTP/1.1\r\nHost: x\r\n\r\n", 405, "open", "method_not_allowed"
    ),
    Shape("no-route", get(b"/admin/secrets"), 404, "open", "no_route"),
    # Traversal, in every encoding, and the path-parameter form Tomcat and Spring decode.
    Shape("dot-dot", get(b"/v8/finance/chart/../../etc/passwd"), 400, "open", "bad_request"),
    Shape("dot", get(b"/v8/finance/chart/."), 400, "open", "bad_request"),
    Shape("encoded-dot-dot", get(b"/v8/finance/chart/%2e%2e"), 400, "open", "bad_request"),
    Shape("mixed-dot-dot", get(b"/v8/finance/chart/.%2E"), 400, "open", "bad_request"),
    Shape("encoded-slash-dot-dot", get(b"/quote/x%2F..%2F..%2Fadmin"), 400, "open", "bad_request"),
    Shape("backslash", get(b"/quote/..%5cadmin"), 400, "open", "bad_request"),
    Shape("dot-dot-semicolon", get(b"/v8/finance/chart/..;"), 400, "open", "bad_request"),
    Shape("dot-dot-semicolon-param", get(b"/v8/finance/chart/..;x=1"), 400, "open", "bad_request"),
    Shape(
        "encoded-dot-dot-semicolon", get(b"/v8/finance/chart/%2e%2e%3b"), 400, "open", "bad_request"
    ),
    Shape("dot-semicolon", get(b"/v8/finance/chart/.;"), 400, "open", "bad_request"),
    # Issue 11 #13: overlong UTF-8 dots, which a lax decoder upstream turns into "../".
    Shape("overlong-dot-dot", get(b"/quote/%C0%AE%C0%AE%C0%AFadmin"), 400, "open", "bad_request"),
    Shape("overlong-segment", get(b"/v8/finance/chart/%C0%AE%C0%AE"), 400, "open", "bad_request"),
    Shape("invalid-utf8", get(b"/quote/%FF%FE"), 400, "open", "bad_request"),
    Shape("encoded-nul", get(b"/quote/a%00b"), 400, "open", "bad_request"),
    Shape(
        "encoded-crlf-in-path", get(b"/quote/a%0d%0aSet-Cookie:%20x"), 400, "open", "bad_request"
    ),
]
# Not refused, on purpose: each is answered as what it is, and nothing is smuggled.
TOLERATED = [
    # Decoded once, forwarded still encoded: an upstream that decodes once sees "%2e%2e".
    Shape(
        "double-encoded-dot-dot",
        get(b"/v8/finance/chart/%252e%252e"),
        200,
        "open",
        upstream=("/v8/finance/chart/%252e%252e",),
    ),
    Shape(
        "encoded-crlf-in-query",
        get(b"/quote/AAPL?x=%0d%0aSet-Cookie:%20a"),
        200,
        "open",
        upstream=("/quote/AAPL?x=%0D%0ASet-Cookie:%20a",),
    ),
    Shape(
        "double-space",
        b"GET  /quote/A HTTP/1.1\r\nHost: x\r\n\r\n",
        200,
        "open",
        upstream=("/quote/A",),
    ),
    # HTTP/1.0 has no chunked coding: RFC 9112 6.1 says treat the framing as faulty and close.
    Shape(
        "te-in-http-1.0",
        post(CHUNKED, version=b"HTTP/1.0", body=b"0\r\n\r\n"),
        200,
        "closed",
        upstream=("/xhr/ncp",),
        upstream_bodies=(b"",),
    ),
    Shape("http-0.9", b"GET /quote/A09\r\n\r\n", 200, "closed", upstream=("/quote/A09",)),
    Shape(
        "get-with-body",
        get(b"/quote/B", b"Content-Length: %d" % len(SMUGGLED)) + SMUGGLED,
        200,
        "open",
        upstream=("/quote/B",),
    ),
    Shape(
        "chunked-body-with-a-request",
        post(CHUNKED, body=b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)),
        200,
        "open",
        upstream=("/xhr/ncp",),
        upstream_bodies=(SMUGGLED,),
    ),
    Shape(
        "websocket-upgrade",
        get(b"/quote/U", b"Upgrade: websocket", b"Connection: Upgrade"),
        200,
        "open",
        upstream=("/quote/U",),
    ),
    # Within the limits: 8000-byte URLs and 120 headers of 8000 bytes (960 KB) are served.
    Shape(
        "url-8000", get(b"/quote/" + b"L" * 8000), 200, "open", upstream=("/quote/" + "L" * 8000,)
    ),
    Shape(
        "120-big-headers", get(b"/quote/H", *many(120, 8000)), 200, "open", upstream=("/quote/H",)
    ),
]
SHAPES = MALFORMED + SMUGGLING + ACCESS + TOLERATED


@pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
async def test_hostile_request(armed: Listening, upstream: CountingUpstream, shape: Shape) -> None:
    async with connection(armed.port) as (reader, writer):
        writer.write(shape.raw)
        await writer.drain()
        await assert_served(armed)  # while the hostile connection is open
        answer = await read_answer(reader)
        if shape.status is None:
            assert answer is None
        else:
            assert answer is not None, "closed without an answer"
            assert answer.status == shape.status, answer
            if shape.error is not None:
                assert answer.headers["content-type"].startswith("application/json")
                assert f'"error": "{shape.error}"'.encode() in answer.body
        if shape.after == "closed":
            assert await closed(reader)
        else:
            assert shape.after == "open"
            writer.write(FOLLOW)
            follow = await read_answer(reader)
            assert follow is not None and (follow.status, follow.body) == (200, b"follow")
    assert hostile_calls(upstream) == list(shape.upstream)
    if shape.upstream_bodies:
        bodies = [s.body for s in upstream.seen if s.path_qs == "/xhr/ncp"]
        assert bodies == list(shape.upstream_bodies)
    assert upstream.calls["/quote/SMUGGLED"] == 0
    await assert_served(armed)  # and after


# --- request bodies ----------------------------------------------------------------------

MiB = 1024 * 1024
CACHE_POST_ROUTES = [
    {"name": "search", "path": "/search", "methods": ["POST"], "upstream": "api",
     "ttl_class": "short", "cache_post": True},
    {"name": "news", "path": "/xhr/ncp", "methods": ["POST"], "upstream": "api", "pass": True},
    {"name": "quote", "path": "/quote/{symbol}", "upstream": "api", "ttl_class": "long",
     "methods": ["GET", "HEAD", "POST"]},
]  # fmt: skip


def head(target: bytes, *headers: bytes) -> bytes:
    return b"\r\n".join([b"POST " + target + b" HTTP/1.1", b"Host: x", *headers, b"", b""])


@pytest.mark.parametrize("target", [b"/xhr/ncp", b"/quote/AAPL", b"/search"])
@pytest.mark.parametrize("expect", [False, True], ids=["plain", "expect-100"])
async def test_a_huge_declared_body_is_413_before_any_of_it_is_read(
    listen: Callable[..., Awaitable[Listening]],
    upstream: CountingUpstream,
    target: bytes,
    expect: bool,
) -> None:
    """Pass-through (route pass), forwarded method (POST on a cached route) and a cached
    POST's body too large to key: 413 at once, nothing upstream, no 100 Continue first."""
    proxy = await listen(routes=CACHE_POST_ROUTES)
    upstream.replies[GOOD] = Reply(body=b"good")
    extra = [b"Expect: 100-continue"] if expect else []
    async with connection(proxy.port) as (reader, writer):
        writer.write(head(target, b"Content-Length: %d" % (10 * 1024 * MiB), *extra))
        answer = await read_answer(reader)
        assert answer is not None and answer.status == 413, answer
        assert b'"error": "payload_too_large"' in answer.body
        await assert_served(proxy)
    assert hostile_calls(upstream) == []


async def test_a_huge_chunked_body_is_413_and_one_at_the_limit_goes_through(
    listen: Callable[..., Awaitable[Listening]], upstream: CountingUpstream
) -> None:
    proxy = await listen()
    upstream.replies.update({GOOD: Reply(body=b"good"), "/xhr/ncp": Reply(body=b"<echo>")})
    chunk = b"x" * (64 * 1024)

    async def send(size: int) -> Answer | None:
        async with connection(proxy.port) as (reader, writer):
            writer.write(head(b"/xhr/ncp", b"Transfer-Encoding: chunked"))
            for _ in range(size // len(chunk)):
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await asyncio.wait_for(writer.drain(), BOUND)
            writer.write(b"0\r\n\r\n")
            return await read_answer(reader)

    over = await send(4 * MiB)
    assert over is not None and over.status == 413, over
    assert proxy.proxy.deps.metrics.upstream_calls["api"] == 0  # not a byte went upstream
    at_limit = await send(MiB)
    assert at_limit is not None and at_limit.status == 200
    assert at_limit.body == b"x" * MiB
    assert [len(s.body) for s in upstream.seen if s.path_qs == "/xhr/ncp"] == [MiB]
    await assert_served(proxy)


def handled(proxy: Listening, route: str) -> int:
    return sum(n for (name, _), n in proxy.proxy.deps.metrics.by_route.items() if name == route)


async def test_aborted_uploads_never_count_against_the_upstream(
    listen: Callable[..., Awaitable[Listening]],
    upstream: CountingUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that hangs up mid-body is the client's failure: it must not open the
    upstream's breaker (2 failures here) for everyone else."""
    proxy = await listen(
        upstreams={"api": {"url": upstream.url, "breaker_failures": 2, "breaker_backoff": "1h"}}
    )
    upstream.replies[GOOD] = Reply(body=b"good")
    for i in range(1, 5):
        async with connection(proxy.port) as (_reader, writer):
            writer.write(head(b"/xhr/ncp", b"Content-Length: 1000") + b"only ten b")
            await writer.drain()
            await eventually(lambda i=i: proxy.server.requests_count == i)  # type: ignore[misc]
        await eventually(lambda i=i: handled(proxy, "news") == i)  # type: ignore[misc]
    await assert_served(proxy)
    assert upstream.calls["/xhr/ncp"] == 0
    assert proxy.proxy.deps.metrics.by_route[("news", "error")] == 4
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # a client's doing


async def test_chunked_framing_broken_mid_body_ends_in_408(
    listen: Callable[..., Awaitable[Listening]], upstream: CountingUpstream
) -> None:
    """A bad chunk after the head was handed over: aiohttp's parser stops feeding the body,
    so it never completes; client_timeout ends it, and nothing went upstream."""
    proxy = await listen(server={"client_timeout": "1s"})
    async with connection(proxy.port) as (reader, writer):
        writer.write(head(b"/xhr/ncp", b"Transfer-Encoding: chunked") + b"5\r\nhello\r\n")
        await eventually(lambda: proxy.server.requests_count == 1)
        writer.write(b"zz\r\nworld\r\n0\r\n\r\n" + FOLLOW)
        answer = await read_answer(reader)
        assert answer is not None and answer.status == 408, answer
        assert answer.headers["connection"] == "close"
    assert upstream.total == 0


@pytest.mark.parametrize("route", ["/xhr/ncp", "/search"])
async def test_gzip_request_bodies_go_upstream_as_sent_and_are_never_inflated(
    listen: Callable[..., Awaitable[Listening]], upstream: CountingUpstream, route: str
) -> None:
    """A gzip body is forwarded as the bytes the client sent, labelled as it labelled them;
    the proxy never inflates it, so a bomb (10 MB of zeros in ~10 KB) costs it ~10 KB."""
    proxy = await listen(routes=CACHE_POST_ROUTES)
    upstream.replies[route] = Reply(body=b"<echo>")
    url = f"http://127.0.0.1:{proxy.port}{route}"
    for plain in (b"hello", bytes(10 * MiB)):
        sent = gzip.compress(plain)
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
        async with proxy.session.post(url, data=sent, headers=headers) as response:
            # the upstream (an aiohttp server, 1 MiB limit) inflates what it gets
            expected = 200 if len(plain) < MiB else 413
            assert response.status == expected, await response.text()
            if expected == 200:
                assert await response.read() == plain
    assert upstream.seen[0].headers["Content-Encoding"] == "gzip"


async def test_a_slow_body_holds_no_upstream_connection_and_gets_408(
    listen: Callable[..., Awaitable[Listening]], upstream: CountingUpstream
) -> None:
    """The upstream allows one connection. A client trickling a body must not hold it while
    other clients' misses wait; after client_timeout it gets 408 and the upstream nothing."""
    proxy = await listen(
        upstreams={"api": {"url": upstream.url, "max_connections": 1, "timeout": "60s"}},
        server={"client_timeout": "1s"},
    )
    upstream.replies[GOOD] = Reply(body=b"good")
    async with connection(proxy.port) as (reader, writer):
        writer.write(head(b"/xhr/ncp", b"Content-Length: 100") + b"ten bytes.")
        await writer.drain()
        await assert_served(proxy)
        answer = await read_answer(reader)
        assert answer is not None and answer.status == 408, answer
        assert b'"error": "request_timeout"' in answer.body
        assert answer.headers["connection"] == "close"  # the rest is never read as a request
    assert upstream.calls["/xhr/ncp"] == 0


async def test_a_slow_cached_post_body_gets_408(
    listen: Callable[..., Awaitable[Listening]], upstream: CountingUpstream
) -> None:
    proxy = await listen(routes=CACHE_POST_ROUTES, server={"client_timeout": "1s"})
    async with connection(proxy.port) as (reader, writer):
        writer.write(head(b"/search", b"Content-Length: 100") + b"ten bytes.")
        answer = await read_answer(reader)
        assert answer is not None and answer.status == 408, answer
        assert answer.headers["connection"] == "close"
    assert upstream.total == 0


# --- slow clients (slowloris) ------------------------------------------------------------


async def test_trickling_heads_do_not_stop_other_clients(
    armed: Listening, upstream: CountingUpstream
) -> None:
    """200 connections each trickle a request head a byte per round; between rounds a
    well-behaved client is served every time."""
    slow_head = b"GET /quote/SLOW HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 64
    async with contextlib.AsyncExitStack() as stack:
        writers = [(await stack.enter_async_context(connection(armed.port)))[1] for _ in range(200)]
        for byte in range(len(slow_head)):
            for writer in writers:
                writer.write(slow_head[byte : byte + 1])
            if byte % 10 == 0:
                await assert_served(armed)
        await assert_served(armed)
    assert upstream.calls["/quote/SLOW"] == 0


@pytest.mark.parametrize(
    "sent",
    [b"", b"GET /quote/AAPL HTTP/1.1\r\nHo", FOLLOW + b"GET /quote/AAPL HTTP/1.1\r\n"],
    ids=["silent", "partial-head", "idle-after-a-response"],
)
async def test_a_head_not_complete_within_client_timeout_is_closed(
    listen: Callable[..., Awaitable[Listening]], upstream: CountingUpstream, sent: bytes
) -> None:
    proxy = await listen(server={"client_timeout": "500ms"})
    upstream.replies["/quote/FOLLOW"] = Reply(body=b"follow")
    async with connection(proxy.port) as (reader, writer):
        writer.write(sent)
        if sent.startswith(FOLLOW):
            answer = await read_answer(reader)
            assert answer is not None and answer.body == b"follow"
        assert await read_answer(reader) is None
    assert hostile_calls(upstream) == []


async def test_a_trickled_head_is_closed_although_bytes_keep_coming(
    listen: Callable[..., Awaitable[Listening]], upstream: CountingUpstream
) -> None:
    """Bytes arriving do not extend the deadline: the head as a whole must arrive in time."""
    proxy = await listen(server={"client_timeout": "500ms"})
    slow_head = b"GET /quote/SLOW HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 4000 + b"\r\n\r\n"
    async with connection(proxy.port) as (reader, writer):
        sent = 0
        with contextlib.suppress(ConnectionError):
            while not reader.at_eof() and sent < len(slow_head):
                writer.write(slow_head[sent : sent + 1])
                await writer.drain()
                sent += 1
                # trickling is what this client does; the server's clock is not ours to drive
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reader.read(1), 0.02)
        assert sent < len(slow_head), "the whole trickled head was accepted"
    assert upstream.calls["/quote/SLOW"] == 0


def test_client_timeout_config() -> None:
    data = base_config("http://127.0.0.1:9")
    assert parse_config(data, env={}).server.client_timeout == 75.0
    data["server"] = {"client_timeout": "5s"}
    assert parse_config(data, env={}).server.client_timeout == 5.0
    for bad in (0, "0s", -1, "soon"):
        data["server"] = {"client_timeout": bad}
        with pytest.raises(ConfigError, match=r"server\.client_timeout"):
            parse_config(data, env={})


async def test_client_timeout_needs_a_restart_to_change(
    make_proxy: ProxyFactory, upstream: CountingUpstream, tmp_path: Path
) -> None:
    """The listener was built with it; a reload says so instead of pretending."""
    proxy = await make_proxy(server={"client_timeout": "5s"})
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(base_config(upstream.url, server={"client_timeout": "9s"})))
    proxy.deps.config_path = path
    answer = await (await proxy.admin.post("/reload")).json()
    assert "server.client_timeout" in answer["restart_needed"]
    assert proxy.deps.config.server.client_timeout == 5.0


# --- logging -----------------------------------------------------------------------------


async def test_malformed_requests_do_not_fill_the_log_with_tracebacks(
    armed: Listening, caplog: pytest.LogCaptureFixture
) -> None:
    # cli.main installs the filter; anyone may send these, as fast as they like.
    server_log = logging.getLogger("aiohttp.server")
    server_log.addFilter(quiet_malformed)
    try:
        with caplog.at_level(logging.DEBUG):
            for raw in (b"GET / HTTP/1.1\r\nHost: x\r\nBad\x00Header: 1\r\n\r\n", b"\x16\x03\x01"):
                async with connection(armed.port) as (reader, writer):
                    writer.write(raw)
                    await writer.drain()
                    answer = await read_answer(reader)
                    assert answer is not None and answer.status == 400
    finally:
        server_log.removeFilter(quiet_malformed)
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert errors == []
    refused = [r for r in caplog.records if r.getMessage().startswith("refused a malformed")]
    assert len(refused) == 2


def test_the_filter_keeps_every_other_server_error() -> None:
    try:
        raise RuntimeError("a handler bug")
    except RuntimeError:
        record = logging.LogRecord(
            "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request", (),
            sys.exc_info(),
        )  # fmt: skip
    assert quiet_malformed(record) is True


@pytest.mark.parametrize(
    ("error", "level"),
    [(BodyBroke("upstream body broke off"), logging.WARNING),
     (ConnectionResetError("client went away"), logging.DEBUG)],
)  # fmt: skip
def test_connections_lost_mid_response_are_one_line_not_a_traceback(
    error: Exception, level: int, caplog: pytest.LogCaptureFixture
) -> None:
    try:
        raise error
    except ConnectionResetError:
        record = logging.LogRecord(
            "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request", (),
            sys.exc_info(),
        )  # fmt: skip
    with caplog.at_level(logging.DEBUG, logger="proxy.server"):
        assert quiet_malformed(record) is False
    [line] = caplog.records
    assert line.levelno == level and line.exc_info is None
