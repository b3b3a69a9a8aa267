"""proxy/quotaheaders.py: what an upstream says is left of its quota, parsed strictly, and
counts that follow it (never the other way), in process and through a real Redis."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import CountingUpstream, ProxyFactory, RedisServer, Reply, layered_cache

from proxy.config import parse_config
from proxy.confnode import Node
from proxy.errors import ConfigError
from proxy.quota import Window
from proxy.quotaheaders import QuotaHeaders, Reported

NOW = 1_700_000_000.0
MINUTE, DAY = Window.parse("5/min"), Window.parse("100/day")


def _config(**api: Any) -> Any:
    data = {
        "upstreams": {"api": {"url": "http://up.example", **api}},
        "ttl_classes": {"short": 60},
        "routes": [{"path": "/q/{s}", "upstream": "api", "ttl_class": "short"}],
    }
    return parse_config(data, env={}).upstreams["api"]


def test_config_reads_quota_headers() -> None:
    u = _config(rate_limit=["5/min", "100/day"],
                quota_headers={"remaining": "X-RateLimit-Remaining",
                               "reset": "X-RateLimit-Reset", "window": "day"})  # fmt: skip
    assert u.quota_headers == QuotaHeaders("X-RateLimit-Remaining", DAY, "X-RateLimit-Reset")
    one = _config(rate_limit="8/min", quota_headers={"remaining": "api-credits-left"})
    assert one.quota_headers == QuotaHeaders("api-credits-left", Window.parse("8/min"))
    assert _config(rate_limit="8/min").quota_headers is None


@pytest.mark.parametrize(
    ("api", "path", "message"),
    [
        ({"quota_headers": {"remaining": "X-Left"}}, "upstreams.api.quota_headers", "rate_limit"),
        ({"rate_limit": ["5/min", "9/day"], "quota_headers": {"remaining": "X-Left"}},
         "upstreams.api.quota_headers.window", "one of min, day"),
        ({"rate_limit": "5/min", "quota_headers": {"remaining": "X-Left", "window": "day"}},
         "upstreams.api.quota_headers.window", "unit of a rate_limit window"),
        ({"rate_limit": "5/min", "quota_headers": {"reset": "X-Reset"}},
         "upstreams.api.quota_headers.remaining", "is required"),
        ({"rate_limit": "5/min", "quota_headers": {"remaining": "X Left"}},
         "upstreams.api.quota_headers.remaining", "header name"),
        ({"rate_limit": "5/min", "quota_headers": {"remaining": "X", "reset": "a:b"}},
         "upstreams.api.quota_headers.reset", "header name"),
        ({"rate_limit": "5/min", "quota_headers": {"remaining": "X", "limit": "Y"}},
         "upstreams.api.quota_headers.limit", "limit"),
    ],
)  # fmt: skip
def test_quota_headers_errors_name_the_field(api: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        _config(**api)
    assert e.value.path == path and message in str(e.value)


def test_parse_needs_a_mapping_node() -> None:
    assert QuotaHeaders.parse(Node(None, "q"), (MINUTE,)) is None


@pytest.mark.parametrize(
    ("remaining", "reset", "expected"),
    [
        ("2", None, Reported(MINUTE, 3)),
        (" 0 ", None, Reported(MINUTE, 5)),
        ("4", "30", Reported(MINUTE, 1, 30.0)),  # seconds from now
        ("4", str(int(NOW) + 20), Reported(MINUTE, 1, 20.0)),  # a Unix time
        ("4", str(int(NOW) + 3600), Reported(MINUTE, 1)),  # not this window's reset: ignored
        ("4", str(int(NOW) - 5), Reported(MINUTE, 1)),  # in the past: ignored
        ("4", "soon", Reported(MINUTE, 1)),
        # Gone within a second (`Reset: 0`): re-counting a whole window per answer cost
        # 100 ms of loop each at 100000/min; nothing to hold back, so nothing learned.
        ("0", "0", None),
        ("0", str(int(NOW)), None),
        ("5", None, None),  # as many as the window allows: nothing to learn
        ("900", None, None),  # more than we allow: never lets us spend more
        ("", None, None),
        ("-1", None, None),
        ("1.5", None, None),
        ("0x10", None, None),
        ("2, 3", None, None),
        ("\uff11", None, None),  # FULLWIDTH DIGIT ONE: a digit, not an ASCII one
        ("9" * 13, None, None),  # bounded
        ("infinity", None, None),
    ],
)
def test_read_is_strict(remaining: str, reset: str | None, expected: Reported | None) -> None:
    headers = QuotaHeaders("X-RateLimit-Remaining", MINUTE, "X-RateLimit-Reset")
    sent = {"X-RateLimit-Remaining": remaining}
    if reset is not None:
        sent["X-RateLimit-Reset"] = reset
    assert headers.read(sent, NOW) == expected


def test_read_without_the_header_learns_nothing_and_day_windows_ignore_the_reset() -> None:
    assert QuotaHeaders("X-Left", DAY).read({}, NOW) is None
    assert QuotaHeaders("X-Left", DAY, "X-Reset").read({"X-Left": "7", "X-Reset": "30"},
                                                       NOW) == Reported(DAY, 93)  # fmt: skip


def _remaining(upstream: CountingUpstream, path: str, left: str, **extra: str) -> None:
    upstream.replies[path] = Reply(headers={"Content-Type": "application/json",
                                            "X-RateLimit-Remaining": left, **extra})  # fmt: skip


_DAY_API = {"rate_limit": "100/day", "rate_limit_wait": 0,
            "quota_headers": {"remaining": "X-RateLimit-Remaining"}}  # fmt: skip


async def test_an_upstream_saying_two_left_gets_at_most_two_more_calls_until_the_reset(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy(upstreams={"api": {"url": upstream.url, **_DAY_API}})
    _remaining(upstream, "/v8/finance/chart/A", "2")
    assert (await proxy.client.get("/v8/finance/chart/A")).status == 200
    statuses = [(await proxy.client.get(f"/v8/finance/chart/B{i}")).status for i in range(5)]
    assert statuses == [200, 200, 503, 503, 503]
    assert upstream.total == 3
    reset = proxy.deps.upstreams.guard("api").quota.reset.next_reset(proxy.clock.now)
    proxy.clock.now = reset
    assert (await proxy.client.get("/v8/finance/chart/C")).status == 200


async def test_an_upstream_saying_more_left_does_not_let_us_spend_more(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    api = {**_DAY_API, "rate_limit": "3/day"}
    proxy = await make_proxy(upstreams={"api": {"url": upstream.url, **api}})
    for i in range(5):
        _remaining(upstream, f"/v8/finance/chart/S{i}", "1000")
    statuses = [(await proxy.client.get(f"/v8/finance/chart/S{i}")).status for i in range(5)]
    assert statuses == [200, 200, 200, 503, 503] and upstream.total == 3


async def test_a_sliding_windows_report_lasts_until_the_reset_it_names(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    api = {"rate_limit": "5/min", "rate_limit_wait": 0,
           "quota_headers": {"remaining": "X-RateLimit-Remaining", "reset": "X-RateLimit-Reset"}}
    proxy = await make_proxy(upstreams={"api": {"url": upstream.url, **api}})  # fmt: skip
    _remaining(upstream, "/v8/finance/chart/A", "0", **{"X-RateLimit-Reset": "20"})
    assert (await proxy.client.get("/v8/finance/chart/A")).status == 200
    assert (await proxy.client.get("/v8/finance/chart/B")).status == 503
    proxy.clock.advance(20)  # the reset it named, well before our own minute is over
    assert (await proxy.client.get("/v8/finance/chart/B")).status == 200
    assert upstream.total == 2


async def test_through_redis_the_fleet_follows_the_report(
    make_proxy: ProxyFactory, upstream: CountingUpstream, redis_server: RedisServer
) -> None:
    cache = layered_cache(redis_server.url)
    one = await make_proxy(upstreams={"api": {"url": upstream.url, **_DAY_API}}, cache=cache)
    other = await make_proxy(upstreams={"api": {"url": upstream.url, **_DAY_API}}, cache=cache)
    other.clock.now = one.clock.now
    _remaining(upstream, "/v8/finance/chart/A", "2")
    assert (await one.client.get("/v8/finance/chart/A")).status == 200
    statuses = [(await other.client.get(f"/v8/finance/chart/B{i}")).status for i in range(2)]
    statuses += [(await one.client.get(f"/v8/finance/chart/C{i}")).status for i in range(2)]
    assert statuses == [200, 200, 503, 503]  # another instance spends the two left
    assert upstream.total == 3


async def test_a_sliding_report_through_redis_expires_at_its_reset(
    make_proxy: ProxyFactory, upstream: CountingUpstream, redis_server: RedisServer
) -> None:
    api = {"rate_limit": "5/min", "rate_limit_wait": 0,
           "quota_headers": {"remaining": "X-RateLimit-Remaining", "reset": "X-RateLimit-Reset"}}
    cache = layered_cache(redis_server.url)
    one = await make_proxy(upstreams={"api": {"url": upstream.url, **api}}, cache=cache)
    other = await make_proxy(upstreams={"api": {"url": upstream.url, **api}}, cache=cache)
    other.clock.now = one.clock.now
    _remaining(upstream, "/v8/finance/chart/A", "1", **{"X-RateLimit-Reset": "20"})
    assert (await one.client.get("/v8/finance/chart/A")).status == 200
    assert (await other.client.get("/v8/finance/chart/B")).status == 200
    assert (await other.client.get("/v8/finance/chart/C")).status == 503
    for proxy in (one, other):
        proxy.clock.advance(20)
    assert (await other.client.get("/v8/finance/chart/C")).status == 200
    assert upstream.total == 3
