"""proxy/guard.py and upstream protection end to end (clocks injected)."""

from __future__ import annotations

import asyncio

import pytest
from conftest import CountingUpstream, ProxyFactory, Reply
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.breaker import CircuitBreaker
from proxy.clock import ManualClock
from proxy.errors import UpstreamError
from proxy.guard import UpstreamGuard
from proxy.quota import RateWindow, Window


@pytest.mark.parametrize(
    ("text", "per_second"),
    [("20/s", 20.0), ("5/min", 5 / 60), ("1.5/sec", 1.5), ("3600/hour", 1.0), (" 10 / m ", 1 / 6)],
)
def test_rate_parse(text: str, per_second: float) -> None:
    assert Window.parse(text).per_second == pytest.approx(per_second)


@pytest.mark.parametrize(
    "text", ["20", "0/s", "-1/s", "5/week", "fast", 20, None, "9" * 400 + "/s"]
)
def test_rate_parse_rejects(text: object) -> None:
    with pytest.raises(ValueError, match="rate"):
        Window.parse(text)


def test_window_bursts_then_queues_reservations_a_period_later() -> None:
    clock = ManualClock()
    window = RateWindow(Window(2, "s"), clock)  # 2/s, burst 2
    assert window.reserve(0) == 0.0
    assert window.reserve(0) == 0.0
    assert window.reserve(0) is None  # both slots of this second taken, no waiting allowed
    assert window.next_token() == pytest.approx(1.0)
    assert window.reserve(1.0) == pytest.approx(1.0)  # queued: a period after the first call
    assert window.reserve(1.0) == pytest.approx(1.0)  # ... and after the second
    assert window.reserve(1.5) is None  # would wait 2 s
    clock.advance(10)
    assert window.reserve(0) == 0.0  # a quiet spell frees the slots, never more than 2
    assert window.reserve(0) == 0.0
    assert window.reserve(0) is None


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(1, 8),
    gaps=st.lists(st.floats(0, 0.7, allow_nan=False), min_size=1, max_size=60),
    max_wait=st.floats(0, 3, allow_nan=False),
)
def test_window_never_admits_more_than_count_in_any_period(
    count: int, gaps: list[float], max_wait: float
) -> None:
    # Found by bench/market.py: a token bucket holding one period's burst let a market-open
    # burst through at 1.4x the limit in one clock second (its burst plus a second's refill).
    clock = ManualClock(0.0)
    window = RateWindow(Window(count, "s"), clock)
    starts: list[float] = []
    for gap in gaps:
        clock.advance(gap)
        wait = window.reserve(max_wait)
        if wait is not None:
            assert 0.0 <= wait <= max_wait
            starts.append(clock.now + wait)
    starts.sort()
    for i in range(len(starts) - count):
        assert starts[i + count] - starts[i] >= 1.0 - 1e-9  # count + 1 calls span a period


async def test_guard_pauses_on_429_with_retry_after_only() -> None:
    clock = ManualClock()
    guard = UpstreamGuard("api", (), CircuitBreaker(5, 1, 60, clock), clock)
    await guard.answered(429, None)
    assert await guard.admit(0) == 0.0  # no Retry-After: no pause
    await guard.answered(429, "30")
    with pytest.raises(UpstreamError) as e:
        await guard.admit(0)
    assert e.value.kind == "rate-limited"
    assert e.value.retry_after == pytest.approx(30)
    clock.advance(30)
    assert await guard.admit(0) == 0.0


async def test_guard_breaker_opens_on_repeated_failures_and_probes_later() -> None:
    clock = ManualClock()
    guard = UpstreamGuard("api", (), CircuitBreaker(3, 1.0, 60, clock), clock)
    await guard.answered(503, None)
    guard.failed("timeout")
    await guard.answered(500, None)
    with pytest.raises(UpstreamError) as e:
        await guard.admit(0)
    assert e.value.kind == "unavailable"
    assert e.value.status == 503
    clock.advance(1.0)
    assert await guard.admit(0) == 0.0  # the probe
    await guard.answered(200, None)
    assert await guard.admit(0) == 0.0


async def test_rate_limit_serves_stale_then_503_with_retry_after(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy(
        upstreams={"api": {"url": upstream.url, "rate_limit": "2/min", "rate_limit_wait": 0}},
        ttl_classes={"short": {"ttl": 60, "stale_if_error": "10m"}, "long": "1h"},
    )
    for symbol in ("A", "B"):  # the two tokens of the minute
        assert (await proxy.client.get(f"/v8/finance/chart/{symbol}")).status == 200
    proxy.clock.advance(61)  # both expired; about two more tokens have dripped in
    for symbol in ("C", "D"):
        assert (await proxy.client.get(f"/v8/finance/chart/{symbol}")).status == 200
    stale = await proxy.client.get("/v8/finance/chart/A")
    assert stale.status == 200
    assert stale.headers["Cache-Status"] == (
        "cacheproxy; hit; fwd=stale; fwd-status=503; detail=stale-if-error"
    )
    nothing = await proxy.client.get("/v8/finance/chart/E")
    assert nothing.status == 503
    assert (await nothing.json())["error"] == "upstream_rate-limited"
    assert nothing.headers["Retry-After"] == "60"  # when C's and D's minute is over
    assert upstream.total == 4  # the limit held


async def test_rate_limit_waits_a_bounded_time_for_a_token(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy(
        upstreams={"api": {"url": upstream.url, "rate_limit": "1/s", "rate_limit_wait": "5s"}},
    )
    await proxy.client.get("/v8/finance/chart/A")
    # The guard's clock is the manual one: the next token is due in 1 s of *its* time, so the
    # request sleeps that long for real before going (bounded by rate_limit_wait).
    second = await proxy.client.get("/v8/finance/chart/B")
    assert second.status == 200
    assert upstream.total == 2


async def test_429_with_retry_after_pauses_the_upstream(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy(
        ttl_classes={"short": {"ttl": 10, "stale_if_error": "10m"}, "long": "1h"}
    )
    await proxy.client.get("/v8/finance/chart/A")
    upstream.replies["/v8/finance/chart/B"] = Reply(
        status=429, body=b"Too Many Requests", headers={"Retry-After": "30"}
    )
    assert (await proxy.client.get("/v8/finance/chart/B")).status == 429
    calls = upstream.total
    proxy.clock.advance(11)  # A expired; 19 s of the pause left
    stale = await proxy.client.get("/v8/finance/chart/A")
    assert stale.headers["Cache-Status"].endswith("detail=stale-if-error")
    paused = await proxy.client.get("/v8/finance/chart/C")
    assert paused.status == 503
    assert paused.headers["Retry-After"] == "19"
    assert upstream.total == calls  # nothing reached the upstream during the pause
    proxy.clock.advance(19)
    assert (await proxy.client.get("/v8/finance/chart/C")).status == 200
    assert upstream.total == calls + 1


async def test_a_failing_upstream_is_not_hammered(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy(
        upstreams={"api": {"url": upstream.url, "breaker_failures": 3, "breaker_backoff": "10s"}}
    )
    upstream.replies["/v8/finance/chart/X"] = Reply(status=503, body=b"down")
    for _ in range(3):
        assert (await proxy.client.get("/v8/finance/chart/X")).status == 503
    for _ in range(20):
        fast = await proxy.client.get("/v8/finance/chart/X")
        assert fast.status == 503
        assert (await fast.json())["error"] == "upstream_unavailable"
    assert upstream.total == 3
    proxy.clock.advance(10)
    upstream.replies["/v8/finance/chart/X"] = Reply()
    assert (await proxy.client.get("/v8/finance/chart/X")).status == 200  # the probe
    assert upstream.total == 4


@pytest.mark.parametrize(
    ("reply", "route"),
    [
        # Found by tests/test_chaos.py: headers 200, then the body breaks. Each call counted
        # a success at the headers, so the breaker never saw consecutive failures.
        (Reply(body=b'{"ok": true, "pad": "' + b"x" * 100 + b'"}', truncate=True), None),
    ],
    ids=["truncated-body"],
)
async def test_answers_that_fail_after_their_headers_open_the_breaker(
    make_proxy: ProxyFactory,
    upstream: CountingUpstream,
    reply: Reply,
    route: dict[str, object] | None,
) -> None:
    chart = {"name": "chart", "path": "/v8/finance/chart/{symbol}", "upstream": "api",
             "ttl_class": "short", **({"error_body": route} if route else {})}  # fmt: skip
    proxy = await make_proxy(
        upstreams={"api": {"url": upstream.url, "breaker_failures": 3, "breaker_backoff": "10s"}},
        routes=[chart],
    )
    upstream.replies["/v8/finance/chart/X"] = reply
    statuses = [(await proxy.client.get("/v8/finance/chart/X")).status for _ in range(10)]
    assert upstream.total == 3, statuses
    assert statuses[3:] == [503] * 7
    proxy.clock.advance(10)
    upstream.replies["/v8/finance/chart/X"] = Reply()
    assert (await proxy.client.get("/v8/finance/chart/X")).status == 200  # the probe
    assert (await proxy.client.get("/v8/finance/chart/Y")).status == 200  # closed again
    assert upstream.total == 5


async def test_connection_errors_are_retried_for_idempotent_requests(
    make_proxy: ProxyFactory,
) -> None:
    accepted = 0

    async def flaky(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await reader.readuntil(b"\r\n\r\n")
        if accepted <= 2:  # hang up without answering, twice
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(flaky, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = await make_proxy(upstreams={"api": {"url": f"http://127.0.0.1:{port}"}})
        response = await proxy.client.get("/v8/finance/chart/RETRY")
        assert response.status == 200
        assert await response.read() == b"ok"
        assert accepted == 3  # exactly 1 + retries (2): aiohttp's own resend is off
        accepted = -100  # never answers again: a POST is not retried
        post = await proxy.client.post("/quote/P", data=b"x")
        assert post.status == 502
        assert accepted == -99
    finally:
        server.close()
        await server.wait_closed()


async def test_retries_need_rate_limit_tokens_too(make_proxy: ProxyFactory) -> None:
    accepted = 0

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = await make_proxy(
            upstreams={"api": {"url": f"http://127.0.0.1:{port}", "rate_limit": "1/min",
                               "rate_limit_wait": 0, "retries": 5}},
        )  # fmt: skip
        response = await proxy.client.get("/v8/finance/chart/X")
        assert response.status == 503  # the retry found no token
        assert accepted == 1
    finally:
        server.close()
        await server.wait_closed()


async def test_requests_queued_for_a_token_respect_a_429_pause(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy(
        upstreams={"api": {"url": upstream.url, "rate_limit": "1/s", "rate_limit_wait": "5s"}},
    )
    upstream.replies["/v8/finance/chart/A"] = Reply(
        status=429, body=b"slow down", headers={"Retry-After": "60"}
    )
    first = asyncio.ensure_future(proxy.client.get("/v8/finance/chart/A"))
    queued = [asyncio.ensure_future(proxy.client.get(f"/v8/finance/chart/Q{i}")) for i in range(2)]
    assert (await first).status == 429
    for response in await asyncio.gather(*queued):
        assert response.status == 503  # paused while they waited for their tokens
    assert upstream.total == 1
