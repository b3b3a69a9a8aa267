"""proxy/market.py: sessions, holidays, DST, and closed-market lifetimes (pure)."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from conftest import CountingUpstream, ProxyFactory

from proxy.config import parse_config
from proxy.errors import ConfigError

NY = ZoneInfo("America/New_York")
MARKETS = {
    "us": {"timezone": "America/New_York", "open": "09:30", "close": "16:00",
           "holidays": ["2026-11-26", "2026-12-25"]},
}  # fmt: skip


def at(text: str) -> float:
    """Epoch seconds of a New York wall-clock time."""
    return datetime.fromisoformat(text).replace(tzinfo=NY).timestamp()


def us_market():  # type: ignore[no-untyped-def]
    data = {
        "upstreams": {"api": {"url": "http://127.0.0.1:9"}},
        "markets": MARKETS,
        "ttl_classes": {"quote": {"ttl": 300, "closed_ttl": "12h"}},
        "routes": [{"path": "/q", "upstream": "api", "ttl_class": "quote"}],
    }
    return parse_config(data, env={}).ttl_classes["quote"]


@pytest.mark.parametrize(
    ("when", "is_open"),
    [
        ("2026-11-24 09:29:59", False),  # Tuesday, before the open
        ("2026-11-24 09:30:00", True),
        ("2026-11-24 15:59:59", True),
        ("2026-11-24 16:00:00", False),  # the close is not in the session
        ("2026-11-26 12:00:00", False),  # Thanksgiving, a holiday
        ("2026-11-28 12:00:00", False),  # Saturday
        ("2026-03-09 10:00:00", True),  # Monday after the DST change, local time still counts
        ("2026-11-02 10:00:00", True),  # Monday after the DST change back
    ],
)
def test_sessions(when: str, is_open: bool) -> None:
    market = us_market().market
    assert market is not None
    assert market.is_open(at(when)) is is_open


@pytest.mark.parametrize(
    ("when", "next_open"),
    [
        ("2026-11-24 08:00:00", "2026-11-24 09:30:00"),
        ("2026-11-24 17:00:00", "2026-11-25 09:30:00"),
        ("2026-11-25 17:00:00", "2026-11-27 09:30:00"),  # skips the holiday
        ("2026-11-27 17:00:00", "2026-11-30 09:30:00"),  # Friday evening -> Monday
        ("2026-03-06 17:00:00", "2026-03-09 09:30:00"),  # across the spring DST change
    ],
)
def test_next_open(when: str, next_open: str) -> None:
    market = us_market().market
    assert market is not None
    assert market.next_open(at(when)) == at(next_open)


@pytest.mark.parametrize(
    ("when", "lifetime"),
    [
        ("2026-11-24 12:00:00", 300.0),  # open: the usual ttl
        ("2026-11-24 09:00:00", 30 * 60 + 30.0),  # until 30 s after the open
        ("2026-11-24 16:30:00", 12 * 3600.0),  # the open is 17 h away: capped at 12 h
        ("2026-11-25 00:00:00", 9.5 * 3600 + 30.0),
    ],
)
def test_lifetime_while_closed(when: str, lifetime: float) -> None:
    assert us_market().lifetime(at(when)) == pytest.approx(lifetime)


@pytest.mark.parametrize(
    ("change", "path", "message"),
    [
        ({"timezone": "Mars/Olympus"}, "markets.us.timezone", "unknown time zone"),
        ({"open": "16:00", "close": "09:30"}, "markets.us.close", "later than open"),
        ({"open": "9h"}, "markets.us.open", "time like 09:30"),
        ({"open": 99999}, "markets.us.open", "time like 09:30"),
        ({"weekdays": ["mon", "funday"]}, "markets.us.weekdays[1]", "weekday"),
        ({"holidays": ["Christmas"]}, "markets.us.holidays[0]", "date like"),
        ({"hours": "9-5"}, "markets.us.hours", "unknown field"),
    ],
)
def test_market_config_errors(change: dict[str, object], path: str, message: str) -> None:
    data = {
        "upstreams": {"api": {"url": "http://127.0.0.1:9"}},
        "markets": {"us": {**MARKETS["us"], **change}},
        "ttl_classes": {"quote": 300},
        "routes": [{"path": "/q", "upstream": "api", "ttl_class": "quote"}],
    }
    with pytest.raises(ConfigError) as e:
        parse_config(data, env={})
    assert e.value.path == path
    assert message in e.value.message


def test_closed_ttl_needs_a_market_when_there_are_several() -> None:
    data = {
        "upstreams": {"api": {"url": "http://127.0.0.1:9"}},
        "markets": {"us": MARKETS["us"], "kr": {**MARKETS["us"], "timezone": "Asia/Seoul"}},
        "ttl_classes": {"quote": {"ttl": 300, "closed_ttl": "12h"}},
        "routes": [{"path": "/q", "upstream": "api", "ttl_class": "quote"}],
    }
    with pytest.raises(ConfigError, match=r"ttl_classes\.quote\.market: is required"):
        parse_config(data, env={})


async def test_entries_fetched_while_closed_live_until_the_open(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy(
        markets=MARKETS,
        ttl_classes={"short": {"ttl": 60, "closed_ttl": "12h"}, "long": "1h"},
    )
    proxy.clock.now = at("2026-11-24 22:00:00")  # Tuesday night; opens in 11.5 h
    await proxy.client.get("/v8/finance/chart/AAPL")
    proxy.clock.now = at("2026-11-25 09:30:29")  # overnight: still the close's data
    hit = await proxy.client.get("/v8/finance/chart/AAPL")
    assert hit.headers["Cache-Status"].startswith("cacheproxy; hit")
    proxy.clock.now = at("2026-11-25 09:30:31")  # trading has started: fetch again
    miss = await proxy.client.get("/v8/finance/chart/AAPL")
    assert miss.headers["Cache-Status"] == "cacheproxy; fwd=miss; stored"
    proxy.clock.now = at("2026-11-25 09:31:32")  # open: the usual 60 s ttl applies
    assert "fwd=miss" in (await proxy.client.get("/v8/finance/chart/AAPL")).headers["Cache-Status"]
    assert upstream.total == 3


def test_a_time_zone_name_too_long_for_a_file_name_is_a_config_error() -> None:
    # Found by tests/test_fuzz.py: ZoneInfo raised OSError (ENAMETOOLONG), a traceback.
    data = {
        "upstreams": {"api": {"url": "http://127.0.0.1:9"}},
        "markets": {"us": {**MARKETS["us"], "timezone": "9" * 400}},
        "ttl_classes": {"quote": 300},
        "routes": [{"path": "/q", "upstream": "api", "ttl_class": "quote"}],
    }
    with pytest.raises(ConfigError, match=r"^markets\.us\.timezone: unknown time zone"):
        parse_config(data, env={})
