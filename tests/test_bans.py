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

from proxy.bans import (
    FLOOR,
    MAX_SKEW,
    URL_FLOOR,
    Bans,
    ban_horizon,
    url_subject,
    valid_subject,
)
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


def test_a_url_ban_on_a_very_long_url_has_a_small_subject_and_still_applies() -> None:
    # Keys reach ~8 KB: a URL subject past 512 characters is a hash, computed alike by the
    # ban (from the resource) and by the lookup (from the key).
    clock = ManualClock(NOW)
    table = bans(clock)
    resource = "api /q/" + "a" * 8000
    subject = url_subject(resource)
    assert subject.startswith("url #") and len(subject) == len("url #") + 32
    assert url_subject("api /q/A") == "url api /q/A"  # short ones stay readable
    assert valid_subject(subject) and not valid_subject("url " + resource)
    table.add(subject, NOW, soft=False)
    old = entry(NOW - 1)
    assert table.verdict(old, f"GET {resource} accept-language=en") == "hard"
    assert table.verdict(old, f"POST {resource} body=0123") == "hard"
    assert table.verdict(old, f"GET {resource}b accept-language=en") is None


@pytest.mark.parametrize(
    ("subject", "valid"),
    [
        ("symbol=AAPL", True),
        ("route=chart", True),
        (FLOOR, True),
        (URL_FLOOR, True),
        ("url api /q/A", True),
        ("s=" + "x" * 510, True),  # 512: as long as admin takes
        ("s=" + "x" * 511, False),
        ("a=" + "x" * 100_000, False),
        ("url " + "x" * 512, True),
        ("url " + "x" * 513, False),  # url_subject hashes anything longer
        ("url ", False),
        ("AAPL", False),
        ("=", False),
        ("", False),
    ],
)
def test_only_subjects_admin_or_url_subject_make_are_valid(subject: str, valid: bool) -> None:
    assert valid_subject(subject) is valid


def test_load_deletes_records_it_cannot_read_whatever_they_hold() -> None:
    # Review finding 2: float(10**400) raised OverflowError out of load, so no later record
    # loaded and the bad one was never deleted. Finding 4: subjects of any size were kept.
    clock = ManualClock(NOW)
    table = bans(clock, horizon=1000.0)
    hostile = {
        b"symbol=HUGE": b'{"h": 1' + b"0" * 400 + b', "s": 0}',  # 10**400
        b"symbol=STR": json.dumps({"h": str(NOW - 1), "s": 0}).encode(),
        b"symbol=BOOL": json.dumps({"h": True, "s": 0}).encode(),
        b"symbol=NAN": b'{"h": NaN, "s": 0}',
        b"symbol=SOFTHUGE": b'{"h": 0, "s": -1' + b"0" * 400 + b"}",
        b"symbol=NOS": json.dumps({"h": NOW - 1}).encode(),
        b"symbol=LIST": b"[1, 2]",
        b"symbol=DIGITS": b'{"h": ' + b"9" * 5000 + b', "s": 0}',  # past int's digit limit
        b"a=" + b"x" * 100_000: json.dumps({"h": NOW - 1, "s": 0}).encode(),
        b"url " + b"x" * 1000: json.dumps({"h": NOW - 1, "s": 0}).encode(),
        b"NOTATAG": json.dumps({"h": NOW - 1, "s": 0}).encode(),
    }
    good = {
        b"symbol=A": json.dumps({"h": NOW - 2, "s": 0}).encode(),
        b"symbol=B": json.dumps({"h": 0, "s": NOW - 3}).encode(),
        b"url api /q/A": json.dumps({"h": NOW - 4, "s": 0}).encode(),
    }
    loaded = table.load({**hostile, **good})  # the good ones last: all still load
    assert table.hard.times == {"symbol=A": NOW - 2}
    assert table.soft.times == {"symbol=B": NOW - 3}
    assert table.urls.times == {"url api /q/A": NOW - 4}
    assert loaded.rewrite == {}
    assert set(loaded.delete) - {FLOOR, URL_FLOOR} == {s.decode() for s in hostile}


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


async def test_bans_hash_records_that_cannot_be_read_are_deleted_and_the_rest_load(
    make_proxy: ProxyFactory, upstream: CountingUpstream, redis_proc: RedisServer
) -> None:
    # Review findings 2 and 4, against the real hash: a stamp of 10**400 stopped every load
    # (at start too), and a 100 KB subject was kept. The good records load; the bad go.
    cache = layered_cache(redis_proc.url)
    bans_hash = cache["redis"]["key_prefix"] + "bans"
    huge_subject = "a=" + "x" * 100_000
    client = Redis.from_url(redis_proc.url)
    try:
        now = time.time()
        await client.hset(bans_hash, mapping={
            "symbol=HUGE": b'{"h": 1' + b"0" * 400 + b', "s": 0}',
            huge_subject: json.dumps({"h": now - 10, "s": 0}),
            "route=quote": json.dumps({"h": now - 10, "s": 0}),
            "symbol=MSFT": json.dumps({"h": 0, "s": now - 10}),
        })  # fmt: skip
        proxy = await make_proxy(cache=cache)  # loads the bans at start
        bans = proxy.deps.store.bans
        assert set(bans.hard.times) == {"route=quote"}
        assert set(bans.soft.times) == {"symbol=MSFT"}
        assert sorted(await client.hkeys(bans_hash)) == [b"route=quote", b"symbol=MSFT"]
    finally:
        await client.aclose()


async def test_a_backplane_ban_with_a_huge_subject_is_ignored(
    make_proxy: ProxyFactory, upstream: CountingUpstream, redis_proc: RedisServer
) -> None:
    # Review finding 4: 3,000 bans with 100 KB subjects held 286 MB.
    cache = layered_cache(redis_proc.url)
    proxy = await make_proxy(cache=cache)
    await connected(proxy)
    channel = cache["redis"]["key_prefix"] + "events"
    stamp = proxy.clock() - 1
    client = Redis.from_url(redis_proc.url)
    try:
        for subject in ("a=" + "x" * 100_000, "url " + "x" * 100_000, "no tag"):
            ban = {"op": "ban", "arg": subject, "origin": "x", "stamp": stamp}
            await client.publish(channel, json.dumps(ban))
        marker = {"op": "ban", "arg": "symbol=MARK", "origin": "x", "stamp": stamp}
        await client.publish(channel, json.dumps(marker))
    finally:
        await client.aclose()
    bans = proxy.deps.store.bans
    await eventually(lambda: "symbol=MARK" in bans.hard.times)
    assert len(bans) == 1
