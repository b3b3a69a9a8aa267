"""proxy/quota.py: windows as values, the daily reset, and multi-window counting in process
(clocks injected: nothing sleeps)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from conftest import CountingUpstream, ProxyFactory, RedisServer, base_config, layered_cache
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.clock import ManualClock
from proxy.config import parse_config
from proxy.confnode import Node
from proxy.errors import ConfigError
from proxy.quota import (
    MAX_WINDOWS,
    Admitted,
    LocalQuota,
    QuotaReset,
    Refused,
    Window,
    parse_windows,
)


@pytest.mark.parametrize(
    ("text", "count", "unit", "shown", "label"),
    [
        ("20/s", 20, "s", "20/s", "1s"),
        ("1.5/sec", 1.5, "s", "1.5/s", "1s"),
        ("5/second", 5, "s", "5/s", "1s"),
        (" 10 / m ", 10, "min", "10/min", "1min"),
        ("8/min", 8, "min", "8/min", "1min"),
        ("60/minute", 60, "min", "60/min", "1min"),
        ("3600/hour", 3600, "h", "3600/h", "1h"),
        ("100/h", 100, "h", "100/h", "1h"),
        ("800/day", 800, "day", "800/day", "1day"),
        ("25/d", 25, "day", "25/day", "1day"),
        ("25/DAY", 25, "day", "25/day", "1day"),
    ],
)
def test_window_parse_and_string_form(
    text: str, count: float, unit: str, shown: str, label: str
) -> None:
    window = Window.parse(text)
    assert window == Window(count, unit)
    assert str(window) == shown
    assert window.label == label
    assert Window.parse(str(window)) == window  # the string form parses back
    assert window.sliding == (unit != "day")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("20", "rate"),
        ("0/s", "positive"),
        ("5/week", "rate"),
        ("1.5/day", "whole calls"),
        ("100001/s", "at most 100000"),
        ("10000001/day", "at most 10000000"),
        ("9" * 400 + "/day", "positive"),
        (20, "rate"),
        (["1/s"], "rate"),
    ],
)
def test_window_parse_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Window.parse(value)


def test_window_fractional_count_is_one_call_per_share_of_the_unit() -> None:
    window = Window.parse("1.5/s")
    assert (window.calls, window.period) == (1, pytest.approx(2 / 3))
    window = Window.parse("8/min")
    assert (window.calls, window.period) == (8, 60.0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ()),
        ([], ()),
        ("5/s", (Window(5, "s"),)),
        (["8/min", "800/day"], (Window(8, "min"), Window(800, "day"))),
        # As an environment variable gives it (${RATE:-...} is a string, not a YAML list):
        ("8/min, 800/day", (Window(8, "min"), Window(800, "day"))),
        ("[8/min,800/day]", (Window(8, "min"), Window(800, "day"))),
    ],
)
def test_rate_limit_takes_one_rate_or_a_list(value: object, expected: tuple[Window, ...]) -> None:
    assert parse_windows(Node(value, "upstreams.api.rate_limit")) == expected


@pytest.mark.parametrize(
    ("value", "path", "message"),
    [
        (["8/min", "fast"], "upstreams.api.rate_limit[1]", "rate"),
        (["8/min", "10/m"], "upstreams.api.rate_limit", "one window per unit"),
        ([f"{n}/s" for n in range(1, MAX_WINDOWS + 2)], "upstreams.api.rate_limit", "at most 8"),
        ({"a": 1}, "upstreams.api.rate_limit", "rate"),
        ("8/min, fast", "upstreams.api.rate_limit[1]", "rate"),
    ],
)
def test_rate_limit_errors_name_their_place(value: object, path: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        parse_windows(Node(value, "upstreams.api.rate_limit"))
    assert e.value.path == path


def test_config_reads_rate_limit_and_quota_reset() -> None:
    data = base_config("http://up.example")
    data["upstreams"]["api"].update(rate_limit=["3/s", "20/day"], quota_reset="09:30 Asia/Seoul")
    upstream = parse_config(data, env={}).upstreams["api"]
    assert upstream.rate_limit == (Window(3, "s"), Window(20, "day"))
    assert upstream.quota_reset == QuotaReset(9, 30, "Asia/Seoul")
    default = parse_config(base_config("http://up.example"), env={}).upstreams["api"]
    assert default.rate_limit == ()
    assert str(default.quota_reset) == "00:00 UTC"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("00:00 Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
        ("24:00 UTC", "time of day"),
        ("midnight", "time of day"),
        ("00:00 ../../etc/passwd", "unknown time zone"),
    ],
)
def test_quota_reset_errors_name_the_field(value: str, message: str) -> None:
    data = base_config("http://up.example")
    data["upstreams"]["api"].update(rate_limit="5/day", quota_reset=value)
    with pytest.raises(ConfigError, match=message) as e:
        parse_config(data, env={})
    assert e.value.path == "upstreams.api.quota_reset"


def _at(text: str, zone: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp()


@pytest.mark.parametrize(
    ("reset", "now", "start", "next_reset"),
    [
        ("00:00 UTC", "2024-03-05 13:00", "2024-03-05 00:00", "2024-03-06 00:00"),
        ("00:00 UTC", "2024-03-05 00:00", "2024-03-05 00:00", "2024-03-06 00:00"),
        ("09:30 UTC", "2024-03-05 08:00", "2024-03-04 09:30", "2024-03-05 09:30"),
    ],
)
def test_reset_in_utc(reset: str, now: str, start: str, next_reset: str) -> None:
    r = QuotaReset.parse(reset)
    assert r.day_start(_at(now, "UTC")) == _at(start, "UTC")
    assert r.next_reset(_at(now, "UTC")) == _at(next_reset, "UTC")


def test_reset_in_new_york_follows_its_clock_through_dst() -> None:
    r = QuotaReset.parse("00:00 America/New_York")
    ny = "America/New_York"
    # 03:00 UTC on 5 March is 22:00 the day before in New York (EST, UTC-5).
    now = datetime(2024, 3, 5, 3, 0, tzinfo=UTC).timestamp()
    assert r.day_start(now) == _at("2024-03-04 00:00", ny) == _at("2024-03-04 05:00", "UTC")
    assert r.next_reset(now) == _at("2024-03-05 05:00", "UTC")
    # 10 March 2024, clocks go forward: the day is 23 hours long, the next one starts at 04:00 UTC.
    now = _at("2024-03-10 12:00", ny)
    assert r.next_reset(now) - r.day_start(now) == 23 * 3600
    assert r.next_reset(now) == _at("2024-03-11 04:00", "UTC")


def _quota(*windows: str, reset: str = "00:00 UTC") -> tuple[LocalQuota, ManualClock]:
    clock = ManualClock(_at("2024-03-05 12:00", "UTC"))
    parsed = tuple(Window.parse(w) for w in windows)
    return LocalQuota(parsed, QuotaReset.parse(reset), clock, clock), clock


def test_local_quota_admits_only_when_every_window_has_room() -> None:
    quota, clock = _quota("3/s", "5/min")
    assert [quota.reserve(0) for _ in range(3)] == [Admitted(0.0, (1, 1)), Admitted(0.0, (2, 2)),
                                                    Admitted(0.0, (3, 3))]  # fmt: skip
    refused = quota.reserve(0)
    assert isinstance(refused, Refused) and refused.retry_after == pytest.approx(1.0)
    clock.advance(1)
    assert quota.reserve(0) == Admitted(0.0, (1, 4))
    assert quota.reserve(0) == Admitted(0.0, (2, 5))
    refused = quota.reserve(0)  # the second has room, the minute none: nothing reserved
    assert isinstance(refused, Refused) and refused.retry_after == pytest.approx(59.0)
    assert quota.used() == (2, 5)
    queued = quota.reserve(60)  # waits for the minute, then holds a slot in both windows
    assert queued == Admitted(pytest.approx(59.0), (3, 5))  # type: ignore[arg-type]
    assert quota.reserve(59.5) == Admitted(pytest.approx(59.0), (3, 5))  # type: ignore[arg-type]
    # The three calls of the first second leave the minute at its end: three slots there.
    assert quota.reserve(59.5) == Admitted(pytest.approx(59.0), (3, 5))  # type: ignore[arg-type]
    refused = quota.reserve(59.5)  # both windows full at that slot: a second later
    assert isinstance(refused, Refused) and refused.retry_after == pytest.approx(60.0)


def test_local_quota_day_window_resets_at_the_configured_time() -> None:
    quota, clock = _quota("3/s", "20/day", reset="00:00 America/New_York")
    ny_midnight = _at("2024-03-06 00:00", "America/New_York")
    admitted = 0
    for _ in range(100):
        answer = quota.reserve(0)
        if isinstance(answer, Admitted):
            admitted += 1
        clock.advance(0.25)
    assert admitted == 20
    refused = quota.reserve(10)
    assert isinstance(refused, Refused)
    assert refused.retry_after == pytest.approx(ny_midnight - clock.now)  # points at the reset
    clock.now = ny_midnight - 0.001
    assert isinstance(quota.reserve(0), Refused)
    clock.now = ny_midnight
    assert quota.reserve(0) == Admitted(0.0, (1, 1))  # a new day


def test_local_quota_never_lets_a_queued_call_cross_into_a_day_it_is_not_counted_in() -> None:
    quota, clock = _quota("1/min", "100/day")
    clock.now = _at("2024-03-05 23:59:30", "UTC")
    assert quota.reserve(0) == Admitted(0.0, (1, 1))
    refused = quota.reserve(120)  # its slot would be 00:00:30, tomorrow
    assert isinstance(refused, Refused) and refused.retry_after == pytest.approx(60)


async def test_three_per_second_and_twenty_a_day_in_process(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    api: dict[str, Any] = {"url": upstream.url, "rate_limit": ["3/s", "20/day"],
                           "rate_limit_wait": 0,
                           "quota_reset": "00:00 America/New_York"}  # fmt: skip
    proxy = await make_proxy(
        upstreams={"api": api},
        ttl_classes={"short": {"ttl": 1, "stale_if_error": "2d"}, "long": "1h"},
    )
    proxy.clock.now = _at("2024-03-05 09:00", "America/New_York")
    statuses = []
    for i in range(40):
        statuses.append((await proxy.client.get(f"/v8/finance/chart/S{i}")).status)
        proxy.clock.advance(0.2)  # 5 requests a second: more than 3/s allows
    assert upstream.total == 20  # the day's budget, no more
    assert statuses.count(200) == 20
    fetched = [i for i, status in enumerate(statuses) if status == 200]
    for i in fetched[:5]:  # the day is spent: a copy serves stale ...
        proxy.clock.advance(3600)
        stale = await proxy.client.get(f"/v8/finance/chart/S{i}")
        assert stale.status == 200
        assert "fwd=stale" in stale.headers["Cache-Status"]
    refused = await proxy.client.get("/v8/finance/chart/NEW")  # ... none: 503 until the reset
    assert refused.status == 503
    reset = _at("2024-03-06 00:00", "America/New_York")
    assert int(refused.headers["Retry-After"]) == pytest.approx(reset - proxy.clock.now, abs=1)
    assert upstream.total == 20
    proxy.clock.now = reset
    assert (await proxy.client.get("/v8/finance/chart/NEW")).status == 200
    assert upstream.total == 21


async def test_quota_gauges_by_upstream_and_window(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy(
        upstreams={"api": {"url": upstream.url, "rate_limit": ["3/s", "20/day"],
                           "rate_limit_wait": 0}},
    )  # fmt: skip
    for symbol in ("A", "B", "A"):  # two calls: the second A is a hit
        await proxy.client.get(f"/v8/finance/chart/{symbol}")
    text = generate_latest(proxy.deps.metrics.registry).decode()
    samples = {
        (s.name, s.labels["window"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("cacheproxy_upstream_quota") and s.labels["upstream"] == "api"
    }
    assert samples == {
        ("cacheproxy_upstream_quota_limit", "1s"): 3, ("cacheproxy_upstream_quota_used", "1s"): 2,
        ("cacheproxy_upstream_quota_limit", "1day"): 20,
        ("cacheproxy_upstream_quota_used", "1day"): 2,
    }  # fmt: skip
    proxy.clock.advance(1)
    text = generate_latest(proxy.deps.metrics.registry).decode()
    assert 'cacheproxy_upstream_quota_used{upstream="api",window="1s"} 0.0' in text


async def test_redis_killed_mid_burst_calls_go_on_under_local_limits(
    make_proxy: ProxyFactory, upstream: CountingUpstream, redis_proc: RedisServer
) -> None:
    proxy = await make_proxy(
        upstreams={"api": {"url": upstream.url, "rate_limit": "5/s", "rate_limit_wait": 0}},
        cache=layered_cache(redis_proc.url, command_timeout="200ms"),
    )
    statuses: list[int] = []

    async def get(path: str) -> None:
        response = await proxy.client.get(path)
        statuses.append(response.status)
        if response.status != 200:  # refused by the quota, never failed by Redis
            assert (await response.json())["error"] == "upstream_rate-limited"
            assert "Retry-After" in response.headers

    for i in range(3):
        await get(f"/v8/finance/chart/A{i}")  # counted in Redis, and here
    redis_proc.stop()
    for i in range(10):
        await get(f"/v8/finance/chart/B{i}")
    assert upstream.total == 5  # the second's 5, counted here once Redis was gone
    proxy.clock.advance(1)
    for i in range(10):
        await get(f"/v8/finance/chart/C{i}")
    assert upstream.total == 10
    assert statuses.count(200) == 10
    assert set(statuses) == {200, 503}
    assert proxy.deps.upstreams.guard("api").fallbacks >= 1
