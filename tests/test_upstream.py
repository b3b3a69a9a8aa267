"""proxy/upstream.py: what an upstream's framing may be. A raw-socket upstream says
`Transfer-Encoding: gzip, chunked`; once aiohttp undoes chunked, the body is still gzip with
nothing left to say so: the proxy must refuse it, never store or relay it as plain."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator

import pytest
from conftest import ProxyFactory

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
