"""proxy/store/redis.py: the L2 edge. fakeredis for the fast unit tests; a real redis-server
for Lua (leases), SCAN over many keys, and a refused, hung and restarted server."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from uuid import uuid4

import fakeredis
import pytest

from proxy.clock import ManualClock
from proxy.config import RedisConfig
from proxy.entry import MAGIC, VERSION, CachedResponse, encode
from proxy.errors import StoreUnavailable
from proxy.keys import escape_glob
from proxy.store.redis import POOL_SIZE, REDIS_GLOB, RedisStore
from proxy.tasks import Tasks

HEAD = struct.Struct(">2sBHdddII")


def new_prefix() -> str:
    return f"t{uuid4().hex[:8]}:"


def dead_url() -> str:
    """A URL on a port where nothing listens (bound, read, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


def entry(
    clock: ManualClock, body: bytes = b"x", ttl: float = 60.0, age: float = 0.0
) -> CachedResponse:
    return CachedResponse(
        status=200,
        headers=(("Content-Type", "application/json"),),
        body=body,
        stored_at=clock() - age,
        ttl=ttl,
        route="chart",
        tags=("symbol=AAPL",),
    )


@pytest.fixture
async def fake(clock: ManualClock, tasks: Tasks) -> AsyncIterator[RedisStore]:
    """A RedisStore on fakeredis (its own fake server)."""
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    store = RedisStore(RedisConfig(key_prefix=new_prefix()), tasks, clock, client=client)
    yield store
    await store.close()


@pytest.fixture
async def real(redis_server: Any, clock: ManualClock, tasks: Tasks) -> AsyncIterator[RedisStore]:
    """A RedisStore on the session's redis-server, under a prefix of its own."""
    config = RedisConfig(url=redis_server.url, key_prefix=new_prefix(), command_timeout=1.0)
    store = RedisStore(config, tasks, clock)
    yield store
    await store.close()


# --- values that do not decode ---------------------------------------------------------

GOOD = encode(
    CachedResponse(status=200, headers=(("A", "b"),), body=b"body", stored_at=1.0, ttl=1e12)
)


def with_byte(data: bytes, index: int, value: int) -> bytes:
    return data[:index] + bytes([value]) + data[index + 1 :]


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"garbage bytes, not an entry at all", id="garbage"),
        pytest.param(b"\x00" * 200, id="zeros"),
        pytest.param(GOOD[:-1], id="truncated-body"),
        pytest.param(GOOD[: HEAD.size - 1], id="truncated-header"),
        pytest.param(GOOD + b"x", id="trailing-bytes"),
        pytest.param(with_byte(GOOD, 2, VERSION + 1), id="newer-version"),
        pytest.param(with_byte(GOOD, 2, 0), id="older-version"),
        pytest.param(b"XX" + GOOD[2:], id="foreign-magic"),
        pytest.param(
            HEAD.pack(MAGIC, VERSION, 200, 1.0, 1e12, 0.0, 5, 0) + b"{nope", id="bad-metadata"
        ),
        pytest.param(
            HEAD.pack(MAGIC, VERSION, 200, 1.0, 1e12, 0.0, 2, 0) + b"\xff\xfe", id="bad-utf8"
        ),
        pytest.param(
            HEAD.pack(MAGIC, VERSION, 200, 1.0, 1e12, 0.0, 2, 0) + b"[]", id="metadata-list"
        ),
    ],
)
async def test_undecodable_value_is_a_counted_miss_and_deleted(
    real: RedisStore, tasks: Tasks, clock: ManualClock, raw: bytes
) -> None:
    await real.client.set(real.entries + "bad", raw)
    await real.set("good", entry(clock))

    assert await real.get("bad") is None
    assert (real.stats.corrupt, real.stats.misses) == (1, 1)
    await tasks.wait()
    assert await real.client.exists(real.entries + "bad") == 0
    # A corrupt neighbour costs nothing else.
    assert await real.get("good") == entry(clock)
    assert (real.stats.corrupt, real.stats.hits) == (1, 1)


async def test_concurrent_gets_of_a_corrupt_value_each_miss(real: RedisStore, tasks: Tasks) -> None:
    await real.client.set(real.entries + "bad", b"junk")
    assert await asyncio.gather(*(real.get("bad") for _ in range(5))) == [None] * 5
    await tasks.wait()
    assert real.stats.misses == 5
    assert await real.client.exists(real.entries + "bad") == 0


async def test_good_value_written_meanwhile_survives_the_corrupt_drop(
    monkeypatch: pytest.MonkeyPatch, real: RedisStore, tasks: Tasks, clock: ManualClock
) -> None:
    await real.client.set(real.entries + "k", b"junk")
    fresh = entry(clock, body=b"fresh")
    original = real.client.mget

    def then_refetched(*args: Any, **kwargs: Any) -> Any:
        async def run() -> Any:
            values = await original(*args, **kwargs)
            # Another instance refetched and wrote between our read and our drop.
            await real.client.set(real.entries + "k", encode(fresh))
            return values

        return run()

    monkeypatch.setattr(real.client, "mget", then_refetched)
    assert await real.get("k") is None
    await tasks.wait()
    monkeypatch.undo()
    assert await real.get("k") == fresh


async def test_scan_skips_undecodable_values(fake: RedisStore, clock: ManualClock) -> None:
    await fake.client.set(fake.entries + "a:bad", b"junk")
    await fake.set("a:good", entry(clock))
    assert [k async for k, _ in fake.scan("a:*")] == ["a:good"]


async def test_get_past_expiry_by_store_clock_is_a_miss(
    fake: RedisStore, clock: ManualClock
) -> None:
    e = entry(clock, ttl=10)
    await fake.set("k", e)
    clock.advance(9.9)
    assert await fake.get("k") == e
    clock.advance(0.1)
    assert await fake.get("k") is None
    assert (fake.stats.hits, fake.stats.misses) == (1, 1)


# --- one MGET per tick ------------------------------------------------------------------


def count_calls(monkeypatch: pytest.MonkeyPatch, store: RedisStore, name: str) -> list[Any]:
    """Wrap store.client.<name>; the returned list gets each call's positional args."""
    calls: list[Any] = []
    original = getattr(store.client, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(store.client, name, spy)
    return calls


@pytest.mark.parametrize(("gets", "distinct"), [(50, 50), (50, 7), (1, 1)])
async def test_concurrent_gets_share_one_mget(
    monkeypatch: pytest.MonkeyPatch, fake: RedisStore, clock: ManualClock, gets: int, distinct: int
) -> None:
    # Every other key is stored, so hits and misses mix within one batch.
    stored = {f"k{i}": entry(clock, body=f"v{i}".encode()) for i in range(0, distinct, 2)}
    for key, e in stored.items():
        await fake.set(key, e)
    calls = count_calls(monkeypatch, fake, "mget")

    keys = [f"k{i % distinct}" for i in range(gets)]
    results = await asyncio.gather(*(fake.get(k) for k in keys))

    assert len(calls) == 1
    assert sorted(calls[0][0]) == sorted({fake.entries + k for k in keys})  # each key once
    assert results == [stored.get(k) for k in keys]


async def test_gets_in_later_ticks_use_a_new_mget(
    monkeypatch: pytest.MonkeyPatch, fake: RedisStore, clock: ManualClock
) -> None:
    await fake.set("a", entry(clock, body=b"a"))
    calls = count_calls(monkeypatch, fake, "mget")
    assert await fake.get("a") == entry(clock, body=b"a")
    assert await fake.get("a") == entry(clock, body=b"a")
    assert len(calls) == 2


async def test_failed_mget_fails_every_waiting_get(
    monkeypatch: pytest.MonkeyPatch, fake: RedisStore
) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RedisConnectionError("refused")

    monkeypatch.setattr(fake.client, "mget", broken)
    results = await asyncio.gather(*(fake.get(f"k{i}") for i in range(10)), return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results)
    assert fake.stats.errors == 1  # one command failed, once


# --- Redis-side expiry -------------------------------------------------------------------


@pytest.mark.parametrize(("ttl", "age"), [(60.0, 0.0), (60.0, 50.0), (3600.0, 0.0), (1.5, 1.0)])
async def test_redis_expiry_is_the_remaining_lifetime(
    fake: RedisStore, clock: ManualClock, ttl: float, age: float
) -> None:
    e = entry(clock, ttl=ttl, age=age)
    await fake.set("k", e)
    expected = (e.expires_at - clock()) * 1000
    pttl = await fake.client.pttl(fake.entries + "k")
    assert expected - 1000 < pttl <= expected


@pytest.mark.parametrize(("ttl", "age"), [(60.0, 61.0), (60.0, 60.0), (0.0, 0.0), (0.0004, 0.0)])
async def test_expired_entry_is_not_written(
    fake: RedisStore, clock: ManualClock, ttl: float, age: float
) -> None:
    await fake.set("k", entry(clock, ttl=ttl, age=age))
    assert await fake.client.exists(fake.entries + "k") == 0
    assert fake.stats.sets == 0


async def test_set_replaces_and_renews_expiry(fake: RedisStore, clock: ManualClock) -> None:
    await fake.set("k", entry(clock, body=b"old", ttl=3600))
    await fake.set("k", entry(clock, body=b"new", ttl=10))
    assert await fake.get("k") == entry(clock, body=b"new", ttl=10)
    assert 9000 < await fake.client.pttl(fake.entries + "k") <= 10000


# --- SCAN-based purges stay inside the prefix --------------------------------------------


async def plant(store: RedisStore, clock: ManualClock, keys: list[str]) -> None:
    raw = encode(entry(clock))
    await store.client.mset({store.entries + k: raw for k in keys})


async def keys_under(store: RedisStore) -> set[str]:
    match = escape_glob(store.entries) + "*"
    return {k.decode() async for k in store.client.scan_iter(match=match)}


@pytest.mark.parametrize(
    ("prefix", "other"),
    [
        ("tU:", "tU2:"),
        # Glob characters in a prefix must be escaped, or they match other prefixes.
        ("tU[x]:", "tUx:"),
        ("tU*:", "tUzz:"),
        ("tU?:", "tUa:"),
    ],
)
async def test_delete_matching_scans_in_batches_and_stays_in_prefix(
    monkeypatch: pytest.MonkeyPatch,
    redis_server: Any,
    clock: ManualClock,
    tasks: Tasks,
    prefix: str,
    other: str,
) -> None:
    base = uuid4().hex[:8]
    prefix, other = prefix.replace("U", base), other.replace("U", base)
    store = RedisStore(RedisConfig(url=redis_server.url, key_prefix=prefix), tasks, clock)
    neighbour = RedisStore(RedisConfig(url=redis_server.url, key_prefix=other), tasks, clock)
    try:
        pages = [f"page:{i}" for i in range(1200)]
        await plant(store, clock, [*pages, "pages", "img:1"])
        await plant(neighbour, clock, ["page:1", "page:2"])
        await store.acquire_lease("page:1", "me", 60)
        scans = count_calls(monkeypatch, store, "scan")
        unlinks = count_calls(monkeypatch, store, "unlink")

        assert await store.delete_matching("page:*") == 1200

        assert len(scans) > 1 and len(unlinks) > 1  # batches, not one KEYS / one UNLINK
        assert await keys_under(store) == {store.entries + "pages", store.entries + "img:1"}
        assert await keys_under(neighbour) == {
            neighbour.entries + "page:1",
            neighbour.entries + "page:2",
        }
        assert await store.client.exists(store.leases + "page:1") == 1
        assert store.stats.deletes == 1200
    finally:
        await store.client.delete(store.leases + "page:1")
        await store.clear()
        await neighbour.clear()
        await store.close()
        await neighbour.close()


@pytest.mark.parametrize(("prefix", "other"), [("tU:", "tU2:"), ("tU[x]:", "tUx:")])
async def test_clear_only_clears_this_prefix(
    redis_server: Any, clock: ManualClock, tasks: Tasks, prefix: str, other: str
) -> None:
    base = uuid4().hex[:8]
    prefix, other = prefix.replace("U", base), other.replace("U", base)
    store = RedisStore(RedisConfig(url=redis_server.url, key_prefix=prefix), tasks, clock)
    neighbour = RedisStore(RedisConfig(url=redis_server.url, key_prefix=other), tasks, clock)
    try:
        await plant(store, clock, [f"k{i}" for i in range(700)])
        await plant(neighbour, clock, ["k1", "k2"])
        assert await store.clear() == 700
        assert await keys_under(store) == set()
        assert len(await keys_under(neighbour)) == 2
        assert await store.clear() == 0
    finally:
        await neighbour.clear()
        await store.close()
        await neighbour.close()


# --- leases (Lua: real Redis) -------------------------------------------------------------


async def test_lease_is_exclusive_until_its_owner_releases_it(real: RedisStore) -> None:
    assert await real.acquire_lease("k", "a", 10) is True
    assert await real.acquire_lease("k", "b", 10) is False
    assert await real.acquire_lease("k", "a", 10) is False  # not re-entrant either
    assert await real.acquire_lease("other", "b", 10) is True  # per key

    await real.release_lease("k", "b")  # not b's: nothing happens
    assert await real.acquire_lease("k", "b", 10) is False
    assert await real.client.get(real.leases + "k") == b"a"

    await real.release_lease("k", "a")
    assert await real.client.exists(real.leases + "k") == 0
    assert await real.acquire_lease("k", "b", 10) is True


@pytest.mark.parametrize(("seconds", "low", "high"), [(0.25, 150, 250), (10, 9000, 10000)])
async def test_lease_expires_by_itself(
    real: RedisStore, seconds: float, low: int, high: int
) -> None:
    assert await real.acquire_lease("k", "a", seconds)
    assert low < await real.client.pttl(real.leases + "k") <= high


# --- popularity ---------------------------------------------------------------------------


async def test_hottest_orders_keys_by_request_count(fake: RedisStore) -> None:
    await fake.add_popularity({"cold": 1, "hot": 5, "warm": 3})
    assert await fake.hottest(2) == [("hot", 5.0), ("warm", 3.0)]
    await fake.add_popularity({"cold": 10})  # counts add up across flushes
    assert await fake.hottest(10) == [("cold", 11.0), ("hot", 5.0), ("warm", 3.0)]
    assert await fake.hottest(1) == [("cold", 11.0)]


async def test_add_popularity_is_one_round_trip(
    monkeypatch: pytest.MonkeyPatch, fake: RedisStore
) -> None:
    pipelines = count_calls(monkeypatch, fake, "pipeline")
    zincrbys = count_calls(monkeypatch, fake, "zincrby")
    await fake.add_popularity({f"k{i}": i + 1 for i in range(50)})
    assert (len(pipelines), len(zincrbys)) == (1, 0)
    assert len(await fake.hottest(100)) == 50


# --- Redis unavailable -----------------------------------------------------------------


async def drain(iterator: AsyncIterator[Any]) -> list[Any]:
    return [x async for x in iterator]


OPS: dict[str, Callable[[RedisStore, ManualClock], Awaitable[Any]]] = {
    "get": lambda s, c: s.get("k"),
    "set": lambda s, c: s.set("k", entry(c)),
    "delete": lambda s, c: s.delete("k"),
    "delete_matching": lambda s, c: s.delete_matching("k*"),
    "clear": lambda s, c: s.clear(),
    "scan": lambda s, c: drain(s.scan()),
    "acquire_lease": lambda s, c: s.acquire_lease("k", "a", 1),
    "release_lease": lambda s, c: s.release_lease("k", "a"),
    "add_popularity": lambda s, c: s.add_popularity({"k": 1}),
    "hottest": lambda s, c: s.hottest(3),
    "publish": lambda s, c: s.publish("events", b"x"),
    "lease_held": lambda s, c: s.lease_held("k"),
    "save_bans": lambda s, c: s.save_bans({"s": b"x"}, ()),
    "load_bans": lambda s, c: s.load_bans(),
    "scan_page": lambda s, c: s.scan_page("*", 0, 10),
    "exists_many": lambda s, c: s.exists_many(["k"]),
}


@pytest.mark.parametrize("op", list(OPS))
async def test_refused_connection_is_store_unavailable(
    clock: ManualClock, tasks: Tasks, op: str
) -> None:
    config = RedisConfig(
        url=dead_url(), key_prefix=new_prefix(), command_timeout=0.1, connect_timeout=0.1
    )
    store = RedisStore(config, tasks, clock)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await OPS[op](store, clock)
        assert time.monotonic() - started < 2
        assert store.stats.errors == 1
    finally:
        await store.close()


async def proc_store(redis_proc: Any, clock: ManualClock, tasks: Tasks) -> RedisStore:
    config = RedisConfig(
        url=redis_proc.url, key_prefix=new_prefix(), command_timeout=0.1, connect_timeout=0.1
    )
    return RedisStore(config, tasks, clock)


async def test_hung_server_times_out_then_recovers(
    redis_proc: Any, clock: ManualClock, tasks: Tasks
) -> None:
    store = await proc_store(redis_proc, clock, tasks)
    try:
        one, two = entry(clock, body=b"one"), entry(clock, body=b"two")
        await store.set("one", one)
        await store.set("two", two)

        redis_proc.hang()
        for op in ("get", "set", "delete"):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await OPS[op](store, clock)
            assert time.monotonic() - started < 2, op  # a bound, not a timing assertion
        assert store.stats.errors == 3

        redis_proc.resume()
        # Each answer belongs to its own command, not to one that timed out earlier.
        assert await store.get("two") == two
        assert await store.get("one") == one
        await store.set("three", one)
        assert await store.get("three") == one
    finally:
        redis_proc.resume()
        await store.close()


async def test_killed_then_restarted_server_is_used_again(
    redis_proc: Any, clock: ManualClock, tasks: Tasks
) -> None:
    store = await proc_store(redis_proc, clock, tasks)
    try:
        await store.set("k", entry(clock))
        assert await store.get("k") == entry(clock)
        redis_proc.stop()
        with pytest.raises(StoreUnavailable):
            await store.get("k")
        with pytest.raises(StoreUnavailable):
            await store.set("k", entry(clock))
        redis_proc.start()
        assert await store.get("k") is None  # nothing was saved
        await store.set("k", entry(clock, body=b"again"))
        assert await store.get("k") == entry(clock, body=b"again")
    finally:
        await store.close()


async def test_large_batches_are_split(
    monkeypatch: pytest.MonkeyPatch, fake: RedisStore, clock: ManualClock
) -> None:
    calls = count_calls(monkeypatch, fake, "mget")
    await asyncio.gather(*(fake.get(f"k{i}") for i in range(250)))
    assert sorted(len(call[0]) for call in calls) == [50, 100, 100]


async def test_a_burst_of_commands_opens_a_bounded_number_of_connections(
    redis_proc: Any, clock: ManualClock, tasks: Tasks
) -> None:
    """Chaos under load found the pool growing to one connection per concurrent command (94
    after a slow-upstream burst of lease calls) and never shrinking; and redis-py's pool
    refuses a command beyond 100 connections, which turned a burst into L2 errors."""
    config = RedisConfig(url=redis_proc.url, command_timeout=2.0, connect_timeout=2.0)
    store = RedisStore(config, tasks, clock)
    probe = RedisStore(config, tasks, clock)  # counts clients from Redis's side
    try:
        leases = await asyncio.gather(*(store.acquire_lease(f"k{i}", "me", 10) for i in range(300)))
        assert all(leases)
        await asyncio.gather(*(store.set(f"k{i}", entry(clock)) for i in range(300)))
        assert store.stats.errors == 0
        clients = await probe.client.client_list()
        assert len(clients) <= POOL_SIZE + 1  # the probe's own
        assert await store.lease_held("k299")
        assert await store.get("k299") == entry(clock)
    finally:
        await store.close()
        await probe.close()


# --- Redis is never handed a costly glob (issue 11 review, finding 8) ---------------------


def scan_matches(monkeypatch: pytest.MonkeyPatch, store: RedisStore) -> list[str]:
    """Wrap store.client.scan; the returned list gets each call's MATCH argument."""
    matches: list[str] = []
    original = store.client.scan

    def spy(*args: Any, **kwargs: Any) -> Any:
        matches.append(kwargs["match"])
        return original(*args, **kwargs)

    monkeypatch.setattr(store.client, "scan", spy)
    return matches


async def test_scan_match_is_only_the_literal_prefix_and_the_glob_is_matched_here(
    monkeypatch: pytest.MonkeyPatch, redis_proc: Any, clock: ManualClock, tasks: Tasks
) -> None:
    # Redis matched the client's glob itself, in its one thread: 200 keys of 8 KB and a
    # dense glob held it 2.75 s per SCAN, and every instance with it. Now it gets the glob's
    # literal prefix (escaped) and `*`, and the glob is matched in Python, in slices.
    store = await proc_store(redis_proc, clock, tasks)
    dense = "q\\*/" + "?*" * 50 + "z"  # `\*`: a literal star, so the prefix is `q*/`
    hits = [f"q*/{'a' * 60}z", f"q*/{'b' * 99}z"]
    misses = [f"q*/{'a' * 10}z", f"q*/{'a' * 60}", f"qq/{'a' * 60}z", f"r*/{'a' * 60}z"]
    try:
        await plant(store, clock, hits + misses)
        matches = scan_matches(monkeypatch, store)

        assert {k async for k, _ in store.scan(dense)} == set(hits)
        cursor, paged = 0, set()
        while True:  # pages may be empty; only cursor 0 ends
            cursor, found = await store.scan_page(dense, cursor, 2)
            paged |= {k for k, _ in found}
            if cursor == 0:
                break
        assert paged == set(hits)
        assert await store.delete_matching(dense) == 2
        sent = list(matches)
        assert await keys_under(store) == {store.entries + k for k in misses}

        assert len(sent) > 3
        assert set(sent) == {escape_glob(store.entries + "q*/") + "*"}
    finally:
        await store.clear()
        await store.close()


async def test_a_short_glob_goes_to_redis_whole(
    monkeypatch: pytest.MonkeyPatch, redis_proc: Any, clock: ManualClock, tasks: Tasks
) -> None:
    # Admin's globs all start `* * `, whose literal prefix is empty: handed only that, Redis
    # sent every key to Python (100k keys: 0.50 s against 0.07 s for SCAN MATCH; second
    # review, finding 3). A glob of at most REDIS_GLOB characters is cheap for Redis's own
    # matcher, so it goes whole (and is matched here again on what comes back).
    store = await proc_store(redis_proc, clock, tasks)
    hits = ["GET api /v8/finance/chart/AAPL", "HEAD api /v8/x accept=y"]
    misses = ["GET api /quote/AAPL", "GET api /v7/x"]
    pattern = "* * /v8/*"
    try:
        await plant(store, clock, hits + misses)
        matches = scan_matches(monkeypatch, store)
        assert {k async for k, _ in store.scan(pattern)} == set(hits)
        assert await store.delete_matching(pattern) == 2
        sent = set(matches)
        assert await keys_under(store) == {store.entries + k for k in misses}
        assert sent == {escape_glob(store.entries) + pattern}
        assert len(pattern) <= REDIS_GLOB
    finally:
        await store.clear()
        await store.close()
