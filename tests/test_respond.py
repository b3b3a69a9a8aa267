"""Hits written as prebuilt bytes (respond.WireResponse): byte-level checks over real sockets
that they say what aiohttp's own Response would, for every shape of request."""

from __future__ import annotations

import asyncio
import gzip
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import CountingUpstream, Proxy, ProxyFactory, Reply

from proxy.entry import CachedResponse
from proxy.respond import WireResponse
from proxy.wire import Wire

BODY = b'{"price": 1}'


async def exchange(proxy: Proxy, raw: bytes, reads_until_close: bool = False) -> bytes:
    """Send raw request bytes on a fresh connection; the bytes that came back."""
    server = proxy.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(raw)
    await writer.drain()
    try:
        if reads_until_close:
            return await asyncio.wait_for(reader.read(), 5)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        if raw.startswith(b"HEAD"):
            return head
        return head + await asyncio.wait_for(reader.readexactly(length), 5)
    finally:
        writer.close()


def fields(response: bytes) -> dict[str, str]:
    head = response.split(b"\r\n\r\n", 1)[0].decode()
    pairs = [line.split(": ", 1) for line in head.split("\r\n")[1:]]
    return {name.lower(): value for name, value in pairs}


@pytest.fixture
async def warm(make_proxy: ProxyFactory, upstream: CountingUpstream) -> Proxy:
    upstream.replies["/quote/A"] = Reply(body=BODY, headers={"Content-Type": "application/json"})
    proxy = await make_proxy()
    assert (await proxy.client.get("/quote/A")).status == 200  # the miss stores it
    return proxy


async def test_a_hit_is_one_well_formed_response_with_cache_status_and_age(warm: Proxy) -> None:
    warm.clock.advance(7)
    raw = await exchange(warm, b"GET /quote/A HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert raw.endswith(b"\r\n\r\n" + BODY)
    got = fields(raw)
    assert got["content-length"] == str(len(BODY))
    assert got["content-type"] == "application/json"
    assert got["age"] == "7"
    assert got["cache-status"].startswith("cacheproxy; hit;")
    assert "date" in got  # the upstream's, kept (RFC 9111 4)
    assert "connection" not in got  # HTTP/1.1 keep-alive is the default


async def test_keep_alive_serves_several_hits_on_one_connection(warm: Proxy) -> None:
    server = warm.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(b"GET /quote/A HTTP/1.1\r\nHost: x\r\n\r\n" * 3)  # pipelined
        for _ in range(3):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 OK")
            assert await asyncio.wait_for(reader.readexactly(len(BODY)), 5) == BODY
    finally:
        writer.close()


async def test_connection_close_is_honoured(warm: Proxy) -> None:
    raw = await exchange(
        warm, b"GET /quote/A HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", True
    )
    assert fields(raw)["connection"] == "close"
    assert raw.endswith(BODY)  # and then the server closed: read() returned


async def test_head_sends_the_length_but_no_body(warm: Proxy) -> None:
    server = warm.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(
            b"HEAD /quote/A HTTP/1.1\r\nHost: x\r\n\r\nGET /quote/A HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert fields(head)["content-length"] == str(len(BODY))
        # The next bytes are the GET's response, not a body after HEAD.
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).startswith(b"HTTP/1.1 200")
    finally:
        writer.close()


async def test_http_1_0_clients_get_aiohttps_own_response(warm: Proxy) -> None:
    raw = await exchange(warm, b"GET /quote/A HTTP/1.0\r\n\r\n", True)
    assert raw.startswith(b"HTTP/1.0 200 OK\r\n")
    assert raw.endswith(BODY)


async def test_gzip_entries_are_inflated_for_clients_without_gzip(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    upstream.replies["/quote/Z"] = Reply(
        body=gzip.compress(BODY), headers={"Content-Encoding": "gzip", "ETag": '"v1"'}
    )
    proxy = await make_proxy()
    await proxy.client.get("/quote/Z")
    zipped = await exchange(
        proxy, b"GET /quote/Z HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n"
    )
    assert gzip.decompress(zipped.split(b"\r\n\r\n", 1)[1]) == BODY
    assert fields(zipped)["etag"] == '"v1"'
    plain = await exchange(proxy, b"GET /quote/Z HTTP/1.1\r\nHost: x\r\n\r\n")
    assert plain.endswith(b"\r\n\r\n" + BODY)
    assert "content-encoding" not in fields(plain)
    assert fields(plain)["etag"] == 'W/"v1"'


def entry(**kw: object) -> CachedResponse:
    values: dict[str, object] = {"status": 200, "headers": (), "body": BODY,
                                 "stored_at": 1_700_000_000.0, "ttl": 60.0, **kw}  # fmt: skip
    return CachedResponse(**values)  # type: ignore[arg-type]


def test_the_head_is_made_once_per_entry() -> None:
    e = entry(headers=(("Content-Type", "application/json"),))
    wire = e.wire()
    assert e.wire() is wire
    assert wire.head is not None and wire.head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert e == entry(headers=(("Content-Type", "application/json"),))  # not part of the value


def test_a_response_without_date_says_when_it_was_received() -> None:
    head = entry().wire().head
    assert head is not None
    assert b"Date: Tue, 14 Nov 2023 22:13:20 GMT\r\n" in head  # RFC 9110 6.6.1, stored_at
    assert b"Content-Type: application/octet-stream\r\n" in head  # as aiohttp would add


@pytest.mark.parametrize(
    "kw",
    [
        {"headers": (("X-Evil", "a\r\nSet-Cookie: stolen=1"),)},  # response splitting
        {"headers": (("X-Evil", "a\nb"),)},
        {"headers": (("Content-Length", "1"),)},  # framing is never a stored field's
        {"headers": (("Transfer-Encoding", "chunked"),)},
        {"status": 204, "body": b""},  # no Content-Length on 204 (RFC 9110 8.6)
        {"status": 304, "body": b""},
    ],
)
def test_heads_that_cannot_be_written_raw_stay_with_aiohttp(kw: dict[str, object]) -> None:
    assert entry(**kw).wire() == Wire(None, False)


def test_wire_response_is_a_stream_response() -> None:
    # aiohttp's server asks every response for keep_alive, prepare and write_eof.
    assert {"keep_alive", "prepare", "write_eof"} <= set(vars(WireResponse))


async def test_a_failed_precondition_says_what_the_cache_did(warm: Proxy) -> None:
    raw = await exchange(warm, b'GET /quote/A HTTP/1.1\r\nHost: x\r\nIf-Match: "zz"\r\n\r\n')
    assert raw.startswith(b"HTTP/1.1 412 ")
    assert fields(raw)["cache-status"].startswith("cacheproxy; hit;")


async def test_a_large_hit_is_written_in_pieces_and_arrives_whole(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    big = bytes(range(256)) * 4000  # ~1 MB: past one piece (CHUNK)
    upstream.replies["/quote/L"] = Reply(body=big, headers={"Content-Type": "text/plain"})
    proxy = await make_proxy()
    await proxy.client.get("/quote/L")
    for close in (b"", b"Connection: close\r\n"):
        raw = await exchange(proxy, b"GET /quote/L HTTP/1.1\r\nHost: x\r\n" + close + b"\r\n")
        assert raw.endswith(b"\r\n\r\n" + big)
        assert fields(raw)["content-length"] == str(len(big))


async def test_an_inflated_hit_says_its_length_and_head_gets_no_body(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    plain = b'{"points": [' + b"1.25, " * 100_000 + b"0]}"  # ~600 KB, ~100x: under the caps
    upstream.replies["/quote/G"] = Reply(
        body=gzip.compress(plain), headers={"Content-Encoding": "gzip"}
    )
    proxy = await make_proxy()
    await proxy.client.get("/quote/G")
    for version in (b"1.1", b"1.0"):
        raw = await exchange(proxy, b"GET /quote/G HTTP/" + version + b"\r\nHost: x\r\n\r\n")
        assert fields(raw)["content-length"] == str(len(plain))
        assert raw.split(b"\r\n\r\n", 1)[1] == plain
        assert "content-encoding" not in fields(raw)
    head = await exchange(proxy, b"HEAD /quote/G HTTP/1.1\r\nHost: x\r\n\r\n")
    assert fields(head)["content-length"] == str(len(plain))


async def test_a_gzip_bomb_is_served_as_stored_to_clients_without_gzip(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    bomb = gzip.compress(bytes(10 * 1024 * 1024))  # ~1000x: past MAX_RATIO
    upstream.replies["/quote/B"] = Reply(body=bomb, headers={"Content-Encoding": "gzip"})
    proxy = await make_proxy()
    await proxy.client.get("/quote/B")
    raw = await exchange(proxy, b"GET /quote/B HTTP/1.1\r\nHost: x\r\n\r\n")
    assert fields(raw)["content-encoding"] == "gzip"  # labelled: no client misreads it
    assert raw.split(b"\r\n\r\n", 1)[1] == bomb


async def test_a_client_gone_when_a_relay_starts_is_not_the_upstreams_failure(
    make_proxy: ProxyFactory, upstream: CountingUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Too large to store, so relayed: the client's going away surfaced from prepare() as
    # aiohttp's ClientConnectionResetError, which the upstream's request() took for a broken
    # upstream (counted against its breaker) and turned into an error response for no one.
    proxy = await make_proxy(cache={"backend": "memory", "max_object_size": 100})
    upstream.replies["/v8/finance/chart/BIG"] = Reply(body=b"x" * 10_000)
    prepare = web.StreamResponse.prepare

    async def gone(self: web.StreamResponse, request: web.BaseRequest) -> Any:
        if type(self) is web.StreamResponse:  # the relay's
            raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")
        return await prepare(self, request)

    monkeypatch.setattr(web.StreamResponse, "prepare", gone)
    # (The client is really still there, so it hears what aiohttp's server says next.)
    await proxy.client.get("/v8/finance/chart/BIG")
    monkeypatch.undo()
    metrics = await (await proxy.admin.get("/metrics")).text()
    assert 'cacheproxy_upstream_errors_total{kind="protocol",upstream="api"}' not in metrics
    assert (await proxy.client.get("/v8/finance/chart/BIG")).status == 200  # relayed whole
