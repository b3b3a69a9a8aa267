"""proxy/bans.py: stamps from other instances and Redis are untrusted, the structure is
bounded and prunes itself, and GET/DELETE /bans; the pure structure with a manual clock,
then against a real Redis (forged backplane events, a forged record in the bans hash)."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pytest
from conftest import CountingUpstream, ProxyFactory, RedisServer, eventually, layered_cache
from redis.asyncio import Redis
from test_layered import connected

from proxy.bans import FLOOR, MAX_SKEW, URL_FLOOR, Bans, ban_horizon, url_subject
from proxy.clock import ManualClock
from proxy.entry import CachedResponse
from proxy.policy import TTLClass

NOW = 1_700_000_000.0


def entry(stored_at: float, route: str = "quote", tags: tuple[str, ...] = ()) -> CachedResponse:
    return CachedResponse(200, (), b"x", stored_at, 60.0, route=route, tags=tags)


def bans(clock: ManualClock, **kwargs: Any) -> Bans:
    return Bans(horizon=kwargs.pop("horizon", 3600.0), clock=clock, **kwargs)


@pytest.mark.parametrize(
    ("stamp", "recorded"),
    [
        (NOW - 5, NOW - 5),  # an ordinary purge a moment ago
        (NOW + 30, NOW + 30),  # another instance's clock a little ahead: as it says
        (NOW + 3600, NOW + MAX_SKEW),  # further ahead than clocks differ: clamped
        (4_102_444_800.0, NOW + MAX_SKEW),  # 2100-01-01
        (math.inf, None),  # what JSON's 1e999 decodes to: refused
        (-math.inf, None),
        (math.nan, None),
        (-1.0, None),
    ],
)
def test_stamps_are_clamped_or_refused(stamp: float, recorded: float | None) -> None:
    clock = ManualClock(NOW)
    table = bans(clock)
    result = table.add("route=quote", stamp, soft=False)
    assert (result.at if result else None) == recorded
    assert table.hard.times.get("route=quote") == recorded


def test_a_forged_stamp_neither_bans_forever_nor_erases_other_bans() -> None:
    clock = ManualClock(NOW)
    table = bans(clock)
    table.add("symbol=MSFT", NOW - 10, soft=False)
    table.add("route=quote", 1e300, soft=False)  # finite, but far in the future
    table.add("route=chart", math.inf, soft=False)
    assert table.hard.times["symbol=MSFT"] == NOW - 10  # still there
    assert "route=chart" not in table.hard.times
    clock.advance(MAX_SKEW + 1)  # past the clamp: entries stored now are served again
    assert table.verdict(entry(clock()), "GET api /quote/AAPL") is None
    assert table.verdict(entry(NOW - 1), "GET api /quote/AAPL") == "hard"


def test_past_the_bound_the_oldest_fold_into_a_floor_and_nothing_is_unpurged() -> None:
    clock = ManualClock(NOW)
    table = bans(clock, tag_limit=3)
    for i in range(5):
        table.add(f"symbol=S{i}", NOW - 100 + i, soft=False)
    assert sorted(table.hard.times) == ["symbol=S2", "symbol=S3", "symbol=S4"]
    assert table.hard.floor == NOW - 99  # S1's time: S0 and S1 folded into it
    # An entry S0's ban purged is still purged; so is any other entry from before S1's ban.
    assert table.verdict(entry(NOW - 101, tags=("symbol=S0",)), "GET api /q/S0") == "hard"
    assert table.verdict(entry(NOW - 99.5), "GET api /q/Z") == "hard"
    assert table.verdict(entry(NOW - 98.5), "GET api /q/Z") is None
    assert table.verdict(entry(NOW - 98.5, tags=("symbol=S2",)), "GET api /q/S2") == "hard"


def test_bans_no_entry_can_predate_are_forgotten() -> None:
    clock = ManualClock(NOW)
    table = bans(clock, horizon=1000.0)
    table.add("symbol=OLD", NOW, soft=False)
    table.add("symbol=OLD", NOW, soft=True)
    clock.advance(1001)
    recorded = table.add("symbol=NEW", clock(), soft=False)
    assert recorded is not None and recorded.forgotten == ("symbol=OLD",)
    assert list(table.hard.times) == ["symbol=NEW"]
    table.add("symbol=NEW", clock(), soft=True)  # each table prunes itself as it is used
    assert list(table.soft.times) == ["symbol=NEW"]


def test_the_horizon_is_the_longest_lifetime_the_classes_allow() -> None:
    short = TTLClass("short", ttl=60, negative_ttl=10, stale_if_error=600)
    long = TTLClass("long", ttl=3600, negative_ttl=60, stale_while_revalidate=30)
    assert ban_horizon([short]) == 60 + 600 + MAX_SKEW
    assert ban_horizon([short, long]) == 3600 + 3600 + MAX_SKEW  # revalidate: one more ttl
    assert ban_horizon([TTLClass("o", ttl=0, negative_ttl=0, origin=True)]) > 100 * 365 * 86400


def test_twenty_thousand_distinct_bans_are_quick() -> None:
    # Bans.add used to scan every ban to prune (O(n)): 20k adds took 5.8 s. A generous
    # bound that an O(n) add misses by orders of magnitude and an O(log n) one meets easily.
    clock = ManualClock(NOW)
    table = bans(clock, tag_limit=10_000, horizon=86400.0)
    started = time.perf_counter()
    for i in range(20_000):
        table.add(f"symbol=S{i}", NOW - 20_000 + i, soft=False)
    assert time.perf_counter() - started < 2.0
    assert len(table) == 10_000 and table.hard.floor == NOW - 10_001


def test_url_bans_apply_to_that_urls_variants_only() -> None:
    clock = ManualClock(NOW)
    table = bans(clock)
    table.add(url_subject("api /q/A"), NOW, soft=False)
    old = entry(NOW - 1)
    assert table.verdict(old, "GET api /q/A accept-language=en") == "hard"
    assert table.verdict(old, "POST api /q/A body=0123") == "hard"
    assert table.verdict(old, "GET api /q/A") is None  # the plain key is deleted outright
    assert table.verdict(old, "GET api /q/AB accept-language=en") is None
    assert table.verdict(entry(NOW + 1), "GET api /q/A accept-language=en") is None


def test_lift_and_listing() -> None:
    clock = ManualClock(NOW)
    table = bans(clock, tag_limit=2)
    for i, tag in enumerate(("a=1", "b=2", "c=3")):
        table.add(tag, NOW + i, soft=False)
    table.add("b=2", NOW, soft=True)
    page, after = table.listing("", 2)
    assert page == [
        {"tag": FLOOR, "hard": NOW, "soft": None},
        {"tag": "b=2", "hard": NOW + 1, "soft": NOW},
    ]
    assert after == "b=2"
    assert table.listing(after, 2) == ([{"tag": "c=3", "hard": NOW + 2, "soft": None}], None)
    assert table.lift("b=2") and not table.lift("b=2")
    assert table.verdict(entry(NOW + 0.5, tags=("b=2",)), "GET api /b/2") is None
    assert table.lift(FLOOR)
    assert table.verdict(entry(NOW - 1), "GET api /x") is None


def test_load_rewrites_clamped_records_and_deletes_bad_ones() -> None:
    clock = ManualClock(NOW)
    table = bans(clock, horizon=1000.0)
    loaded = table.load({
        b"route=quote": json.dumps({"h": 4_102_444_800.0, "s": 0}).encode(),  # 2100
        b"symbol=OK": json.dumps({"h": NOW - 1, "s": 0}).encode(),
        b"symbol=OLD": json.dumps({"h": NOW - 5000, "s": 0}).encode(),
        b"symbol=INF": b'{"h": 1e999, "s": 0}',
        b"junk": b"[[[",
    })  # fmt: skip
    assert table.hard.times == {"route=quote": NOW + MAX_SKEW, "symbol=OK": NOW - 1}
    assert set(loaded.rewrite) == {"route=quote"}
    assert json.loads(loaded.rewrite["route=quote"]) == {"h": NOW + MAX_SKEW, "s": 0.0}
    # (and the floors' records, which a prune may have moved; none here)
    assert set(loaded.delete) - {FLOOR, URL_FLOOR} == {"symbol=OLD", "symbol=INF", "junk"}


# --- against a real Redis ----------------------------------------------------------------


async def test_a_forged_backplane_ban_neither_bans_forever_nor_erases_bans(
    make_proxy: ProxyFactory, upstream: CountingUpstream, redis_proc: RedisServer
) -> None:
    cache = layered_cache(redis_proc.url)
    a, b = await make_proxy(cache=cache), await make_proxy(cache=cache)
    await connected(a, b)
    a.clock.advance(1)
    await a.admin.post("/purge", json={"tag": "symbol=MSFT"})
    await eventually(lambda: "symbol=MSFT" in b.deps.store.bans.hard.times)
    channel = cache["redis"]["key_prefix"] + "events"
    client = Redis.from_url(redis_proc.url)
    try:  # what anyone who can PUBLISH on Redis can send: 1e999 is infinite in JSON
        await client.publish(channel, b'{"op": "ban", "arg": "route=quote", "origin": "x", '
                                      b'"stamp": 1e999}')  # fmt: skip
        year_2100 = {"op": "ban", "arg": "route=chart", "origin": "x", "stamp": 4102444800.0}
        await client.publish(channel, json.dumps(year_2100))
    finally:
        await client.aclose()
    await eventually(lambda: "route=chart" in b.deps.store.bans.hard.times)
    assert "route=quote" not in b.deps.store.bans.hard.times
    assert "symbol=MSFT" in b.deps.store.bans.hard.times  # not erased
    assert b.deps.store.bans.hard.times["route=chart"] == b.clock() + MAX_SKEW  # clamped
    b.clock.advance(MAX_SKEW + 1)
    for path in ("/quote/AAPL", "/v8/finance/chart/AAPL"):
        await b.client.get(path)
        again = await b.client.get(path)
        assert again.headers["Cache-Status"].startswith("cacheproxy; hit"), path


async def test_a_bans_hash_record_dated_2100_does_not_survive_a_restart(
    make_proxy: ProxyFactory, upstream: CountingUpstream, redis_proc: RedisServer
) -> None:
    cache = layered_cache(redis_proc.url)
    bans_hash = cache["redis"]["key_prefix"] + "bans"
    client = Redis.from_url(redis_proc.url)
    try:
        await client.hset(bans_hash, "route=quote", json.dumps({"h": 4102444800.0, "s": 0}))
        first = await make_proxy(cache=cache)  # loads the bans at start
        assert first.deps.store.bans.hard.times["route=quote"] == first.clock() + MAX_SKEW
        stored = json.loads(await client.hget(bans_hash, "route=quote") or b"{}")
        assert stored["h"] == first.clock() + MAX_SKEW  # written back clamped
        later = await make_proxy(cache=cache)  # a restart, after the clamped time
        later.clock.advance(MAX_SKEW + 1)
        await later.client.get("/quote/AAPL")
        again = await later.client.get("/quote/AAPL")
        assert again.headers["Cache-Status"].startswith("cacheproxy; hit")
    finally:
        await client.aclose()


async def test_bans_are_listed_and_lifted_everywhere(
    make_proxy: ProxyFactory, upstream: CountingUpstream, redis_proc: RedisServer
) -> None:
    cache = layered_cache(redis_proc.url)
    a, b = await make_proxy(cache=cache), await make_proxy(cache=cache)
    await connected(a, b)
    await b.client.get("/quote/AAPL")
    await b.deps.store.flush()
    a.clock.advance(1)
    b.clock.advance(1)
    await a.admin.post("/purge", json={"tag": "symbol=AAPL", "soft": True})
    await eventually(lambda: "symbol=AAPL" in b.deps.store.bans.soft.times)
    listed = await (await b.admin.get("/bans")).json()
    assert listed == {
        "bans": [{"tag": "symbol=AAPL", "hard": None, "soft": a.clock()}],
        "total": 1,
        "next_after": None,
    }
    lifted = await a.admin.delete("/bans/symbol=AAPL")
    assert lifted.status == 200
    assert await lifted.json() == {"lifted": True, "tag": "symbol=AAPL", "l2": True}
    await eventually(lambda: not b.deps.store.bans.soft.times)
    client = Redis.from_url(redis_proc.url)
    try:
        assert await client.hgetall(cache["redis"]["key_prefix"] + "bans") == {}
    finally:
        await client.aclose()
    hit = await b.client.get("/quote/AAPL")  # no longer soft-purged: a hit
    assert hit.headers["Cache-Status"].startswith("cacheproxy; hit")
    assert (await a.admin.get("/bans?limit=0")).status == 400
