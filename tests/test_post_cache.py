"""Opt-in POST caching keyed on the body (Yahoo's news is a POST with a JSON body)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from conftest import Answer, CountingUpstream, ProxyFactory, Reflecting, Reply

from proxy.config import parse_config
from proxy.errors import ConfigError

NEWS = {
    "routes": [
        {"name": "ncp", "path": "/xhr/ncp", "methods": ["POST"], "upstream": "api",
         "ttl_class": "short", "cache_post": True},
        {"name": "quote", "path": "/quote/{symbol}", "methods": ["GET", "POST"],
         "upstream": "api", "ttl_class": "long"},
    ]
}  # fmt: skip


def news_body(symbol: str) -> bytes:
    return json.dumps({"serviceConfig": {"snippetCount": 10, "s": [symbol]}}).encode()


async def test_identical_posts_share_an_entry_and_different_bodies_do_not(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy(**NEWS)
    upstream.replies["/xhr/ncp"] = Reply(body=b"<echo>")
    json_type = {"Content-Type": "application/json"}
    url = "/xhr/ncp?queryRef=latestNews"
    first = await proxy.client.post(url, data=news_body("AAPL"), headers=json_type)
    assert first.headers["Cache-Status"] == "cacheproxy; fwd=miss; stored"
    assert await first.read() == news_body("AAPL")  # the upstream got the body
    assert upstream.seen[0].method == "POST"
    assert upstream.seen[0].headers["Content-Type"] == "application/json"
    again = await proxy.client.post(url, data=news_body("AAPL"), headers=json_type)
    assert again.headers["Cache-Status"].startswith("cacheproxy; hit")
    assert await again.read() == news_body("AAPL")
    other = await proxy.client.post(url, data=news_body("MSFT"), headers=json_type)
    assert other.headers["Cache-Status"] == "cacheproxy; fwd=miss; stored"
    as_text = await proxy.client.post(
        url, data=news_body("AAPL"), headers={"Content-Type": "text/plain"}
    )
    assert as_text.headers["Cache-Status"] == "cacheproxy; fwd=miss; stored"
    assert upstream.calls["/xhr/ncp"] == 3
    keys = [k async for k, _ in proxy.deps.store.scan()]
    assert all("AAPL" not in key and "body=" in key for key in keys)  # a hash, never the body


async def test_large_or_unsized_post_bodies_are_forwarded_uncached(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy(**NEWS)
    upstream.replies["/xhr/ncp"] = Reply(body=b"<echo>")
    big = b"x" * (64 * 1024 + 1)
    for _ in range(2):
        response = await proxy.client.post("/xhr/ncp", data=big)
        assert response.headers["Cache-Status"] == "cacheproxy; fwd=bypass; detail=post-body"
        assert await response.read() == big

    async def chunks():  # type: ignore[no-untyped-def]
        yield b"no "
        yield b"length"

    chunked = await proxy.client.post("/xhr/ncp", data=chunks())
    assert chunked.headers["Cache-Status"] == "cacheproxy; fwd=bypass; detail=post-body"
    assert upstream.calls["/xhr/ncp"] == 3


async def test_multipart_posts_are_forwarded_uncached(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    # Each multipart body has its own random boundary: keyed, each would be stored and
    # never hit, pushing useful entries out (review of issue 11).
    proxy = await make_proxy(**NEWS)
    upstream.replies["/xhr/ncp"] = Reply(body=b"<echo>")
    body = b'--b1\r\nContent-Disposition: form-data; name="s"\r\n\r\nAAPL\r\n--b1--\r\n'
    headers = {"Content-Type": "multipart/form-data; boundary=b1"}
    for _ in range(2):
        response = await proxy.client.post("/xhr/ncp", data=body, headers=headers)
        assert response.headers["Cache-Status"] == "cacheproxy; fwd=bypass; detail=post-multipart"
        assert await response.read() == body
    assert upstream.calls["/xhr/ncp"] == 2
    assert len(proxy.l1) == 0


async def test_uncached_posts_on_a_cache_post_route_purge_nothing(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    # The route says its POSTs are queries: one too large or multipart to cache is forwarded
    # as it is, and must not purge the entries of that URL (anyone could empty them so).
    proxy = await make_proxy(**NEWS)
    upstream.replies["/xhr/ncp"] = Reply(body=b"<echo>")
    json_type = {"Content-Type": "application/json"}
    url = "/xhr/ncp?queryRef=latestNews"
    await proxy.client.post(url, data=news_body("AAPL"), headers=json_type)
    proxy.clock.advance(1)
    multipart = {"Content-Type": "multipart/form-data; boundary=b1"}
    await proxy.client.post(url, data=b"--b1--\r\n", headers=multipart)
    await proxy.client.post(url, data=b"x" * (64 * 1024 + 1))
    proxy.clock.advance(1)
    again = await proxy.client.post(url, data=news_body("AAPL"), headers=json_type)
    assert again.headers["Cache-Status"].startswith("cacheproxy; hit")
    assert upstream.calls["/xhr/ncp"] == 3


async def test_only_a_multipart_media_type_is_multipart(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy(**NEWS)
    upstream.replies["/xhr/ncp"] = Reply(body=b"<echo>")
    odd = {"Content-Type": "application/json; boundary=x"}  # not multipart: keyed as sent
    first = await proxy.client.post("/xhr/ncp", data=news_body("AAPL"), headers=odd)
    assert first.headers["Cache-Status"] == "cacheproxy; fwd=miss; stored"


async def test_posts_on_routes_without_cache_post_still_pass_through(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy(**NEWS)
    for _ in range(2):
        response = await proxy.client.post("/quote/AAPL", data=b"order")
        assert response.headers["Cache-Status"] == "cacheproxy; fwd=method; detail=method"
    assert upstream.calls["/quote/AAPL"] == 2


def test_cache_post_needs_post_among_the_methods() -> None:
    data = {
        "upstreams": {"api": {"url": "http://127.0.0.1:9"}},
        "ttl_classes": {"t": 60},
        "routes": [{"path": "/x", "upstream": "api", "ttl_class": "t", "cache_post": True}],
    }
    with pytest.raises(ConfigError, match=r"routes\[0\]\.cache_post: needs POST"):
        parse_config(data, env={})


def as_read(request: web.Request, body: bytes) -> tuple[bytes, dict[str, str]]:
    """An upstream whose answer depends on how it reads the body (charset, coding)."""
    read = f"{request.headers.get('Content-Type')} | {request.headers.get('Content-Encoding')}"
    return f"{read} | {len(body)} bytes".encode(), {"Content-Type": "text/plain"}


async def test_a_post_sent_with_another_charset_or_coding_never_fills_the_victims_entry(
    make_proxy: ProxyFactory, reflecting: Callable[[Answer], Awaitable[Reflecting]]
) -> None:
    """Issue 11 #8: the key hashed the bare media type and the body, but the full
    Content-Type and the Content-Encoding go upstream: the attacker's bytes, sent as
    `charset=utf-16` and `gzip`, filled the victim's entry."""
    up = await reflecting(as_read)
    proxy = await make_proxy(upstreams={"api": {"url": up.url, "timeout": "5s"}}, **NEWS)
    body = news_body("AAPL")
    attacker = {"Content-Type": "application/json; charset=utf-16", "Content-Encoding": "gzip"}
    victim = {"Content-Type": "application/json"}
    first = await proxy.client.post("/xhr/ncp", data=body, headers=attacker)
    assert await first.read() == b"application/json; charset=utf-16 | gzip | %d bytes" % len(body)
    mine = await proxy.client.post("/xhr/ncp", data=body, headers=victim)
    assert mine.headers["Cache-Status"] == "cacheproxy; fwd=miss; stored"
    assert await mine.read() == b"application/json | None | %d bytes" % len(body)
    again = await proxy.client.post("/xhr/ncp", data=body, headers=victim)
    assert again.headers["Cache-Status"].startswith("cacheproxy; hit")
    assert await again.read() == b"application/json | None | %d bytes" % len(body)
    theirs = await proxy.client.post("/xhr/ncp", data=body, headers=attacker)
    assert theirs.headers["Cache-Status"].startswith("cacheproxy; hit")
    assert b"gzip" in await theirs.read()
    assert up.total == 2


@pytest.mark.parametrize(
    "other",
    [{"Content-Type": "application/json; charset=utf-16"}, {"Content-Encoding": "gzip"},
     {"Content-Type": "Application/JSON"}],
    ids=["charset", "coding", "case"],
)  # fmt: skip
async def test_each_way_of_reading_a_body_has_its_own_entry(
    make_proxy: ProxyFactory, upstream: CountingUpstream, other: dict[str, str]
) -> None:
    proxy = await make_proxy(**NEWS)
    upstream.replies["/xhr/ncp"] = Reply(body=b"<echo>")
    body = gzip.compress(news_body("AAPL")) if "Content-Encoding" in other else news_body("A")
    plain = {"Content-Type": "application/json"}
    variant = {**plain, **other}
    for headers in (plain, variant):
        response = await proxy.client.post("/xhr/ncp", data=body, headers=headers)
        assert response.headers["Cache-Status"] == "cacheproxy; fwd=miss; stored"
    sent = [
        (s.headers.get("Content-Type"), s.headers.get("Content-Encoding")) for s in upstream.seen
    ]
    assert sent == [
        (plain["Content-Type"], None),
        (variant["Content-Type"], other.get("Content-Encoding")),
    ]
