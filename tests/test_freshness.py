"""Freshness end to end: stale-while-revalidate, stale-if-error, refresh-ahead (clock injected)."""

from __future__ import annotations

import asyncio
import gzip

import pytest
from conftest import CountingUpstream, Proxy, ProxyFactory, Reply


def _classes(**fields: object) -> dict[str, object]:
    return {"ttl_classes": {"short": {"ttl": 60, **fields}, "long": "1h"}}


@pytest.mark.parametrize(
    ("failure", "fwd_status"),
    [
        (Reply(status=503, body=b'{"error": "down"}'), 503),
        (Reply(status=429, body=b"Too Many Requests", headers={"Retry-After": "30"}), 429),
        (Reply(status=500, body=b"boom"), 500),
    ],
)
async def test_stale_if_error_serves_the_old_entry_within_its_window_only(
    make_proxy: ProxyFactory, upstream: CountingUpstream, failure: Reply, fwd_status: int
) -> None:
    proxy = await make_proxy(**_classes(stale_if_error=120))
    path = "/v8/finance/chart/AAPL"
    upstream.replies[path] = Reply(body=b'{"price": 1}')
    await proxy.client.get(path)
    upstream.replies[path] = failure
    proxy.clock.advance(61)
    stale = await proxy.client.get(path)
    assert stale.status == 200
    assert await stale.read() == b'{"price": 1}'
    assert stale.headers["Cache-Status"] == (
        f"cacheproxy; hit; fwd=stale; fwd-status={fwd_status}; detail=stale-if-error"
    )
    assert stale.headers["Age"] == "61"
    proxy.clock.advance(119)  # 180 s after storing: 120 s past ttl, the window is over
    past = await proxy.client.get(path)
    assert past.status == fwd_status
    # The failures never replaced the good entry while it was usable, nor were stored.
    assert upstream.calls[path] == 3


async def test_stale_if_error_covers_timeouts_and_refused_connections(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy(
        upstreams={"api": {"url": upstream.url, "timeout": "300ms"}},
        **_classes(stale_if_error="5m"),
    )
    await proxy.client.get("/v8/finance/chart/MSFT")
    proxy.clock.advance(100)
    upstream.gate = asyncio.Event()  # the upstream hangs: a timeout
    stale = await proxy.client.get("/v8/finance/chart/MSFT")
    assert stale.status == 200
    assert "fwd-status=504; detail=stale-if-error" in stale.headers["Cache-Status"]
    upstream.gate.set()
    assert upstream.server is not None
    await upstream.server.close()  # the upstream is gone: connection refused
    refused = await proxy.client.get("/v8/finance/chart/MSFT")
    assert refused.status == 200
    assert "fwd-status=502; detail=stale-if-error" in refused.headers["Cache-Status"]
    stats = await (await proxy.admin.get("/stats")).json()
    assert stats["routes"]["chart"]["outcomes"]["stale_error"] == 2


async def test_200_concurrent_stale_hits_make_one_background_refresh(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy(**_classes(stale_while_revalidate=30))
    path = "/v8/finance/chart/TSLA"
    upstream.replies[path] = Reply(body=b'{"v": 1}')
    await proxy.client.get(path)
    proxy.clock.advance(65)
    upstream.replies[path] = Reply(body=b'{"v": 2}')
    upstream.gate = asyncio.Event()  # the refresh stays in flight while the hits arrive
    responses = await asyncio.gather(*(proxy.client.get(path) for _ in range(200)))
    assert all(r.status == 200 for r in responses)
    assert {await r.read() for r in responses} == {b'{"v": 1}'}  # served at once, stale
    assert {r.headers["Cache-Status"] for r in responses} == {
        "cacheproxy; hit; fwd=stale; detail=stale-while-revalidate"
    }
    assert {r.headers["Age"] for r in responses} == {"65"}
    upstream.gate.set()
    await proxy.deps.tasks.wait()
    assert upstream.calls[path] == 2  # the first fetch and exactly one refresh
    fresh = await proxy.client.get(path)
    assert fresh.headers["Cache-Status"].startswith("cacheproxy; hit; ttl=")
    assert await fresh.read() == b'{"v": 2}'


async def test_a_failed_refresh_keeps_the_good_entry(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy(**_classes(stale_while_revalidate=30))
    path = "/v8/finance/chart/NVDA"
    upstream.replies[path] = Reply(body=b'{"good": true}')
    await proxy.client.get(path)
    proxy.clock.advance(61)
    upstream.replies[path] = Reply(status=503, body=b"down")
    first = await proxy.client.get(path)
    await proxy.deps.tasks.wait()
    second = await proxy.client.get(path)
    await proxy.deps.tasks.wait()
    for response in (first, second):
        assert await response.read() == b'{"good": true}'
        assert "fwd=stale" in response.headers["Cache-Status"]
    assert upstream.calls[path] == 3  # both stale hits tried one refresh each, in turn


async def test_refresh_ahead_keeps_a_hot_key_from_ever_missing(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy: Proxy = await make_proxy(**_classes(refresh_ahead=0.5))
    path = "/v8/finance/chart/GOOG"
    await proxy.client.get(path)
    statuses = []
    for _ in range(60):  # 10 minutes = 10 TTLs, one request every 10 s
        proxy.clock.advance(10)
        response = await proxy.client.get(path)
        statuses.append(response.headers["Cache-Status"])
        await proxy.deps.tasks.wait()  # let a refresh that started land
    assert all(s.startswith("cacheproxy; hit; ttl=") for s in statuses), statuses
    # One refresh per ~30 s (half the ttl), never a client-facing miss.
    assert 15 <= upstream.calls[path] <= 22


def _av_route(**extra: object) -> dict[str, object]:
    return {
        "routes": [
            {"name": "av", "path": "/query", "upstream": "api", "ttl_class": "short",
             "error_body": {"json_keys": ["Note", "Information", "Error Message"],
                            "contains": ["API limit reached"]}},
        ],
        **extra,
    }  # fmt: skip


@pytest.mark.parametrize(
    "body",
    [
        b'{"Note": "Thank you for using Alpha Vantage! Our standard API call frequency is 5 '
        b'calls per minute"}',
        b'{"Information": "We have detected your API key ... 25 requests per day."}',
        b'{"Error Message": "Limit Reach . Please upgrade your plan"}',
        b"API limit reached. Please try again later. Remaining Limit: 0",
    ],
)
async def test_api_error_bodies_are_never_stored(
    make_proxy: ProxyFactory, upstream: CountingUpstream, body: bytes
) -> None:
    proxy = await make_proxy(**_av_route())
    upstream.replies["/query"] = Reply(body=body)
    for _ in range(2):
        response = await proxy.client.get("/query?function=GLOBAL_QUOTE&symbol=IBM")
        assert response.status == 200  # the client sees what the API said
        assert response.headers["Cache-Status"] == "cacheproxy; fwd=miss; detail=api-error"
    assert upstream.calls["/query"] == 2
    assert len(proxy.l1) == 0
    metrics = await (await proxy.admin.get("/metrics")).text()
    assert 'cacheproxy_upstream_errors_total{kind="api-error",upstream="api"} 2.0' in metrics


async def test_api_error_bodies_open_the_upstream_breaker(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    # Each call used to count a success at its 200 headers before its body was judged an
    # API error, so the breaker never saw consecutive failures (see test_chaos.py).
    api = {"url": upstream.url, "breaker_failures": 3, "breaker_backoff": "10s"}
    proxy = await make_proxy(**_av_route(upstreams={"api": api}))
    upstream.replies["/query"] = Reply(body=b'{"Note": "5 calls per minute"}')
    statuses = [(await proxy.client.get(f"/query?symbol=S{i}")).status for i in range(10)]
    assert statuses == [200] * 3 + [503] * 7  # the API's own words, then the breaker
    assert upstream.calls["/query"] == 3
    proxy.clock.advance(10)
    upstream.replies["/query"] = Reply()
    assert (await proxy.client.get("/query?symbol=P")).status == 200  # the probe closes it
    assert (await proxy.client.get("/query?symbol=Q")).status == 200
    assert upstream.calls["/query"] == 5


async def test_an_api_error_body_lets_stale_if_error_serve_the_good_entry(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy(
        **_av_route(ttl_classes={"short": {"ttl": 60, "stale_if_error": "1h"}, "long": "1h"})
    )
    good = b'{"Global Quote": {"01. symbol": "IBM", "05. price": "187.2"}}'
    upstream.replies["/query"] = Reply(
        body=gzip.compress(good), headers={"Content-Encoding": "gzip"}
    )
    await proxy.client.get("/query?function=GLOBAL_QUOTE&symbol=IBM")
    proxy.clock.advance(61)
    upstream.replies["/query"] = Reply(body=gzip.compress(b'{"Note": "5 calls per minute"}'),
                                       headers={"Content-Encoding": "gzip"})  # fmt: skip
    stale = await proxy.client.get(
        "/query?function=GLOBAL_QUOTE&symbol=IBM", headers={"Accept-Encoding": "identity"}
    )
    assert await stale.read() == good
    assert stale.headers["Cache-Status"].endswith("detail=stale-if-error")


async def test_a_200_without_markers_is_stored_as_usual(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy(**_av_route())
    upstream.replies["/query"] = Reply(body=b'{"Global Quote": {"Notes": "fine"}}')
    await proxy.client.get("/query?function=GLOBAL_QUOTE&symbol=IBM")
    hit = await proxy.client.get("/query?function=GLOBAL_QUOTE&symbol=IBM")
    assert hit.headers["Cache-Status"].startswith("cacheproxy; hit")


async def test_a_request_waiting_on_a_failed_refresh_still_gets_stale_if_error(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy(
        upstreams={"api": {"url": upstream.url, "timeout": "300ms"}},
        **_classes(stale_while_revalidate=30, stale_if_error=600),
    )
    path = "/v8/finance/chart/AMZN"
    await proxy.client.get(path)
    proxy.clock.advance(61)
    upstream.gate = asyncio.Event()  # the refresh hangs until it times out
    stale = await proxy.client.get(path)  # within grace: served, refresh started
    assert "stale-while-revalidate" in stale.headers["Cache-Status"]
    proxy.clock.advance(40)  # past grace, within stale-if-error; the refresh still runs
    waiter = await proxy.client.get(path)
    assert waiter.status == 200
    assert waiter.headers["Cache-Status"].endswith("detail=stale-if-error")
    upstream.gate.set()
    await proxy.deps.tasks.wait()
    assert upstream.calls[path] == 2  # the first fetch and the one refresh: no third call


async def test_a_refresh_that_gets_something_unstorable_lets_its_waiters_fetch(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy(**_classes(stale_while_revalidate=30))
    path = "/v8/finance/chart/PRIV"
    await proxy.client.get(path)
    proxy.clock.advance(61)
    upstream.replies[path] = Reply(headers={"Set-Cookie": "s=1"})  # the refresh's answer
    upstream.gate = asyncio.Event()
    upstream.arrived.clear()
    assert "stale-while-revalidate" in (await proxy.client.get(path)).headers["Cache-Status"]
    await asyncio.wait_for(upstream.arrived.wait(), 5)  # the refresh is at the upstream
    proxy.clock.advance(40)  # past grace: the next request waits on the refresh
    waiter = asyncio.ensure_future(proxy.client.get(path))
    await asyncio.sleep(0.05)  # let it join the refresh's flight
    upstream.gate.set()
    response = await waiter
    assert response.status == 200  # fetched for itself, not a 502
    assert response.headers["Cache-Status"] == "cacheproxy; fwd=miss; detail=set-cookie"


async def test_api_error_sniffing_inflates_no_more_than_an_entry_may_hold(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    # A 61 KB gzip bomb (60 MB inflated) on a route with error markers: the sniff used to
    # inflate up to 64 MB per miss, outside every bound. Now at most max_object_size.
    import tracemalloc

    proxy = await make_proxy(**_av_route(cache={"max_object_size": "1MB"}))
    bomb = gzip.compress(b" " * 60_000_000)
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    upstream.replies["/query"] = Reply(body=bomb, headers=headers)
    tracemalloc.start()
    try:
        response = await proxy.client.get("/query?symbol=BOMB", headers={"Accept-Encoding": "gzip"})
        assert response.status == 200  # its body stays unread: the test client would inflate it
        assert response.headers["Content-Encoding"] == "gzip"
        response.release()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000, peak
