"""Hostile requests (issue 7, item 2): malformed and oversized requests, smuggling shapes,
absolute-form and CONNECT, traversal, slow clients and huge bodies. Each gets its exact answer
(or a closed connection) over a raw socket to a real listening proxy, the upstream receives
nothing it should not, and a well-behaved client on another connection is served meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from conftest import CountingUpstream, Proxy, ProxyFactory, Reply

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


@contextlib.asynccontextmanager
async def connection(
    proxy: Proxy,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    port = proxy.client.port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def assert_served(proxy: Proxy) -> None:
    """A well-behaved client on a connection of its own gets its answer."""
    response = await asyncio.wait_for(proxy.client.get(GOOD), BOUND)
    assert response.status == 200
    assert await response.read() == b"good"


def hostile_calls(upstream: CountingUpstream) -> list[str]:
    return [seen.path_qs for seen in upstream.seen if seen.path_qs not in CONTROL_PATHS]


@pytest.fixture
async def armed(make_proxy: ProxyFactory, upstream: CountingUpstream) -> Proxy:
    """A proxy with a short client_timeout, and an upstream whose answers say which path
    they answer, so a response can never pass for another."""
    upstream.replies.update(
        {
            GOOD: Reply(body=b"good"),
            "/quote/FOLLOW": Reply(body=b"follow"),
            "/quote/SMUGGLED": Reply(body=b"smuggled"),
            "/xhr/ncp": Reply(body=b"<echo>"),
        }
    )
    return await make_proxy()


@dataclass(frozen=True)
class Shape:
    """A hostile request and what must come of it.

    `after`: "closed" (the server closes the connection), "open" (a request that follows on
    the same connection is answered, and answered as itself), or "ignored" (the parser has
    left HTTP on this connection: nothing that follows is answered or forwarded, and the
    client_timeout closes it).
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
async def test_hostile_request(armed: Proxy, upstream: CountingUpstream, shape: Shape) -> None:
    async with connection(armed) as (reader, writer):
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
            with contextlib.suppress(ConnectionError):
                writer.write(FOLLOW)
                await writer.drain()
            if shape.after == "open":
                follow = await read_answer(reader)
                assert follow is not None and (follow.status, follow.body) == (200, b"follow")
            else:
                assert shape.after == "ignored"
                assert await read_answer(reader) is None  # closed by client_timeout
                assert upstream.calls["/quote/FOLLOW"] == 0
    assert hostile_calls(upstream) == list(shape.upstream)
    if shape.upstream_bodies:
        assert [s.body for s in upstream.seen if s.path_qs == "/xhr/ncp"] == list(
            shape.upstream_bodies
        )
    assert upstream.calls["/quote/SMUGGLED"] == 0
    await assert_served(armed)  # and after
