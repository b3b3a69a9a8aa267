"""Upstream connections: idle ones are let go before common servers drop them, and a request
whose kept-alive connection the upstream closed before answering is sent once more
(issue 11, finding 14). And what an upstream's framing may be (finding 13)."""

from __future__ import annotations

import asyncio
import gzip
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp.connector
import pytest
from conftest import ProxyFactory

from proxy.config import parse_config

Action = Literal["answer", "close", "reset", "partial"]


@dataclass
class RawUpstream:
    """A bare HTTP/1.1 server on asyncio streams: keeps connections alive, and for each
    request does what `policy(connection, index on that connection)` says."""

    policy: Callable[[int, int], Action]
    seen: list[tuple[int, int, str]] = field(default_factory=list)  # (conn, index, method)
    connections: int = 0
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        try:
            for index in range(1_000):
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return  # the client let the connection go
                lines = head.decode("latin-1").split("\r\n")
                length = next(
                    (int(line.split(":", 1)[1]) for line in lines
                     if line.lower().startswith("content-length:")), 0,
                )  # fmt: skip
                await reader.readexactly(length)
                self.seen.append((conn, index, lines[0].split(" ")[0]))
                action = self.policy(conn, index)
                if action == "answer":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    await writer.drain()
                    continue
                if action == "partial":  # the answer began: it must never be sent again
                    writer.write(b"HTTP/1.1 200")
                    await writer.drain()
                elif action == "reset":  # RST instead of FIN
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                # "close": what a server does when its idle timer fires as our request
                # arrives: the connection just ends, with no answer.
                return
        finally:
            writer.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[Callable[[int, int], Action]], Any]]:
    servers: list[asyncio.Server] = []

    async def start(policy: Callable[[int, int], Action]) -> RawUpstream:
        upstream = RawUpstream(policy)
        server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
        upstream.port = server.sockets[0].getsockname()[1]
        servers.append(server)
        return upstream

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def _config(url: str, **upstream: Any) -> dict[str, Any]:
    return {
        "upstreams": {"api": {"url": url, "timeout": "5s", **upstream}},
        "ttl_classes": {"short": 60},
        "routes": [
            {"name": "write", "path": "/write", "methods": ["POST", "PUT"], "upstream": "api",
             "pass": True},
            {"name": "read", "path": "/read", "upstream": "api", "pass": True},
        ],
    }  # fmt: skip


def _first_answered_then(action: Action) -> Callable[[int, int], Action]:
    """Answer the first request on each connection; do `action` to the second."""
    return lambda conn, index: "answer" if index == 0 else action


# --- a reused connection the upstream closed ---------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT"])
@pytest.mark.parametrize("closing", ["close", "reset"])
async def test_a_body_request_on_a_closed_kept_alive_connection_is_sent_again(
    make_proxy: ProxyFactory, raw_upstream: Any, method: str, closing: Action
) -> None:
    upstream = await raw_upstream(_first_answered_then(closing))
    proxy = await make_proxy(**_config(upstream.url))
    first = await proxy.client.request(method, "/write", data=b"one")
    assert (first.status, await first.read()) == (200, b"ok")
    # aiohttp gave the connection back to its pool as soon as it read the body to its end:
    # this request goes on it, and the upstream drops it.
    second = await proxy.client.request(method, "/write", data=b"two")
    assert (second.status, await second.read()) == (200, b"ok")  # before: 502 upstream-connect
    assert upstream.seen == [(1, 0, method), (1, 1, method), (2, 0, method)]


async def test_a_request_is_not_sent_again_once_its_answer_began(
    make_proxy: ProxyFactory, raw_upstream: Any
) -> None:
    upstream = await raw_upstream(_first_answered_then("partial"))
    proxy = await make_proxy(**_config(upstream.url, retries=0))
    assert (await proxy.client.post("/write", data=b"one")).status == 200
    assert (await proxy.client.post("/write", data=b"two")).status == 502
    assert upstream.seen == [(1, 0, "POST"), (1, 1, "POST")]


@pytest.mark.parametrize("closing", ["close", "reset"])
async def test_a_post_on_a_fresh_connection_is_never_sent_again(
    make_proxy: ProxyFactory, raw_upstream: Any, closing: Action
) -> None:
    upstream = await raw_upstream(lambda conn, index: closing)
    proxy = await make_proxy(**_config(upstream.url))
    resp = await proxy.client.post("/write", data=b"once")
    assert resp.status == 502
    assert upstream.seen == [(1, 0, "POST")]  # the upstream may have applied it: once only


async def test_a_get_is_resent_once_then_retried_as_before(
    make_proxy: ProxyFactory, raw_upstream: Any
) -> None:
    # Every connection answers its first request and drops its second.
    upstream = await raw_upstream(_first_answered_then("close"))
    proxy = await make_proxy(**_config(upstream.url))
    assert (await proxy.client.get("/read")).status == 200
    assert (await proxy.client.get("/read")).status == 200
    assert len(upstream.seen) == 3


# --- idle connections are let go in time ------------------------------------------------


def test_idle_timeout_defaults_below_common_servers() -> None:
    config = parse_config(_config("http://up.example"), env={})
    assert config.upstreams["api"].idle_timeout == 4.0  # Node, uvicorn, Apache: 5 s
    config = parse_config(_config("http://up.example", idle_timeout="500ms"), env={})
    assert config.upstreams["api"].idle_timeout == 0.5


async def test_a_connection_idle_past_idle_timeout_is_not_reused(
    make_proxy: ProxyFactory, raw_upstream: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr(aiohttp.connector, "monotonic", lambda: now[0])  # the pool's clock
    upstream = await raw_upstream(lambda conn, index: "answer")
    proxy = await make_proxy(**_config(upstream.url, idle_timeout="4s"))
    assert (await proxy.client.get("/read")).status == 200
    now[0] += 3.9
    assert (await proxy.client.get("/read")).status == 200
    assert upstream.connections == 1  # reused within its idle time
    now[0] += 4.1
    assert (await proxy.client.get("/read")).status == 200
    assert upstream.connections == 2  # before: aiohttp's 15 s kept the old one


async def test_idle_timeout_zero_never_reuses(make_proxy: ProxyFactory, raw_upstream: Any) -> None:
    upstream = await raw_upstream(lambda conn, index: "answer")
    proxy = await make_proxy(**_config(upstream.url, idle_timeout=0))
    for _ in range(3):
        assert (await proxy.client.get("/read")).status == 200
    assert upstream.connections == 3


# --- framing: no transfer coding but chunked (issue 11, finding 13) ------------------------
# A raw-socket upstream says `Transfer-Encoding: gzip, chunked`; once aiohttp undoes chunked,
# the body is still gzip with nothing left to say so: the proxy must refuse it, never store
# or relay it as plain.

PLAIN = b'{"price": 1}'


def _chunked(body: bytes) -> bytes:
    return f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"


async def _raw_upstream(transfer_encoding: str) -> AsyncIterator[str]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (int(line.split(b":")[1]) for line in head.split(b"\r\n")
                     if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
                await reader.readexactly(length)
                coded = gzip.compress(PLAIN) if "gzip" in transfer_encoding else PLAIN
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Transfer-Encoding: {transfer_encoding}\r\n\r\n".encode()
                    + _chunked(coded)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()


@pytest.fixture(params=["gzip, chunked", "GZIP,chunked", "x-gzip, chunked", "identity, chunked"])
async def coded_upstream(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    async for url in _raw_upstream(request.param):
        yield url


async def test_a_transfer_coding_besides_chunked_is_refused_not_stored(
    make_proxy: ProxyFactory, coded_upstream: str
) -> None:
    proxy = await make_proxy(upstreams={"api": {"url": coded_upstream, "timeout": "5s"}})
    for _ in range(2):
        response = await proxy.client.get("/quote/A", headers={"Accept-Encoding": "identity"})
        assert response.status == 502
        assert (await response.json())["error"] == "upstream_protocol"
    assert proxy.l1_keys() == []  # never stored raw


async def test_a_transfer_coding_besides_chunked_is_refused_on_pass_through(
    make_proxy: ProxyFactory, coded_upstream: str
) -> None:
    proxy = await make_proxy(upstreams={"api": {"url": coded_upstream, "timeout": "5s"}})
    response = await proxy.client.post("/xhr/ncp", data=b"{}")
    assert response.status == 502
    assert (await response.json())["error"] == "upstream_protocol"


async def test_plain_chunked_is_served_and_stored(make_proxy: ProxyFactory) -> None:
    async for url in _raw_upstream("chunked"):
        proxy = await make_proxy(upstreams={"api": {"url": url, "timeout": "5s"}})
        response = await proxy.client.get("/quote/A")
        assert response.status == 200
        assert await response.read() == PLAIN
        assert response.headers["Cache-Status"] == "cacheproxy; fwd=miss; stored"
        post = await proxy.client.post("/xhr/ncp", data=b"{}")
        assert await post.read() == PLAIN
