"""GET /keys pagination: every key exactly once, across L1 and L2; filters; redaction."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
from collections.abc import Callable
from typing import Any

import pytest
from conftest import (
    CountingUpstream,
    Proxy,
    ProxyFactory,
    RedisServer,
    layered_cache,
    layered_store,
)

from proxy.breaker import CircuitBreaker
from proxy.clock import ManualClock
from proxy.config import RedisConfig
from proxy.entry import CachedResponse
from proxy.errors import StoreUnavailable
from proxy.glob import Glob
from proxy.listing import MAX_PENDING, page
from proxy.store.guarded import Guarded
from proxy.store.layered import LayeredStore
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore
from proxy.tasks import Tasks


async def all_pages(proxy: Proxy, limit: int, **params: str) -> tuple[list[dict[str, Any]], int]:
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = {"limit": str(limit), **params, **({"cursor": cursor} if cursor else {})}
        body = await (await proxy.admin.get("/keys", params=query)).json()
        items.extend(body["keys"])
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return items, pages
        assert pages < 100


async def test_pages_cover_every_key_exactly_once(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy()
    urls = [f"/v8/finance/chart/S{i:02d}" for i in range(23)]
    for url in urls:
        await proxy.client.get(url)
    items, pages = await all_pages(proxy, limit=5)
    assert sorted(item["url"] for item in items) == sorted(urls)
    assert pages == 5
    assert all(item["layers"] == ["l1"] and item["route"] == "chart" for item in items)


async def test_pages_span_l1_and_l2_without_repeats(
    make_proxy: ProxyFactory, upstream: CountingUpstream, redis_server: RedisServer
) -> None:
    cache = layered_cache(redis_server.url)
    writer, reader = await make_proxy(cache=cache), await make_proxy(cache=cache)
    for i in range(12):  # in L2 only (as far as the reader knows)
        await writer.client.get(f"/quote/W{i:02d}")
    for i in range(6):  # in the reader's L1 and in L2
        await reader.client.get(f"/quote/R{i:02d}")
    await writer.deps.store.flush()
    await reader.deps.store.flush()
    items, _ = await all_pages(reader, limit=4)
    urls = [item["url"] for item in items]
    assert len(urls) == len(set(urls)) == 18
    layers = {item["url"]: item["layers"] for item in items}
    assert layers["/quote/R00"] == ["l1", "l2"]
    assert layers["/quote/W00"] == ["l2"]


async def test_route_and_pattern_filters_and_redaction(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy()
    await proxy.client.get("/quote/AAPL?apikey=CLIENT-SECRET")
    await proxy.client.get("/v8/finance/chart/AAPL")
    quotes, _ = await all_pages(proxy, limit=10, route="quote")
    assert [item["route"] for item in quotes] == ["quote"]
    assert "CLIENT-SECRET" not in str(quotes)
    assert "apikey=#" in quotes[0]["url"]  # the value is a hash
    charts, _ = await all_pages(proxy, limit=10, pattern="/v8/*")
    assert [item["url"] for item in charts] == ["/v8/finance/chart/AAPL"]


def _cursor(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode()


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage",
        "WyJsMyIsIDBd",
        "WyJsMiIsICJ4Il0",
        base64.urlsafe_b64encode(b"[" * 5000).decode(),  # a RecursionError: 500 before
        _cursor(["l2", [0, 0]]),  # the SCAN step and offset cursors gave out before
        _cursor(["l2", [2**64, ""]]),
        _cursor(["l2", [0, "AAAA"]]),  # not whole digests
        _cursor(["l2", [0, base64.urlsafe_b64encode(bytes(16 * 65)).decode()]]),  # too many
        _cursor(["l2", [0, "\u00e9" * 16]]),
    ],
)
async def test_a_bad_cursor_is_400(proxy: Proxy, cursor: str) -> None:
    response = await proxy.admin.get("/keys", params={"cursor": cursor})
    assert response.status == 400
    assert (await response.json())["error"] == "bad_request"


async def test_l2_pages_respect_the_limit_and_keys_moving_between_layers_still_list_once(
    make_proxy: ProxyFactory, upstream: CountingUpstream, redis_server: RedisServer
) -> None:
    cache = layered_cache(redis_server.url)
    writer, reader = await make_proxy(cache=cache), await make_proxy(cache=cache)
    urls = [f"/quote/K{i:03d}" for i in range(230)]
    for url in urls:
        await writer.client.get(url)
    await writer.deps.store.flush()
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = {"limit": "25", **({"cursor": cursor} if cursor else {})}
        body = await (await reader.admin.get("/keys", params=query)).json()
        assert len(body["keys"]) <= 25
        seen.extend(item["url"] for item in body["keys"])
        await reader.client.get(urls[pages])  # traffic: an L2 hit copies a key into L1
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert pages < 100
    assert sorted(seen) == sorted(urls)
    assert pages >= 10


async def test_an_l1_page_lets_the_loop_run_while_it_matches(
    monkeypatch: pytest.MonkeyPatch, clock: ManualClock, tasks: Tasks
) -> None:
    # It yielded every 1000 keys: 1000 keys of 8 KB and a dense pattern held the loop 8 s
    # (issue 11 review, finding 7). It yields by time now; with a slice of 0, after each key.
    store = LayeredStore(MemoryStore(1000, 10**9, clock), [], tasks, "i", clock)
    for i in range(100):
        await store.set(f"GET api /q/{i}", CachedResponse(200, (), b"x", clock(), 60.0))
    turns = 0
    at_match: list[int] = []
    matches = Glob.matches

    def counted(glob: Glob, key: str) -> bool:
        at_match.append(turns)
        return matches(glob, key)

    async def turn() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    monkeypatch.setattr(Glob, "matches", counted)
    turning = asyncio.ensure_future(turn())
    await asyncio.sleep(0)
    listed, cursor = await page(store, "GET api /q/*", None, None, 1000, slice_seconds=0.0)
    turning.cancel()
    assert len(listed) == 100 and cursor is None
    assert len(set(at_match)) > 50  # other tasks ran between the matches


async def test_listing_reaches_redis_only_through_its_breaker(
    clock: ManualClock, tasks: Tasks
) -> None:
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    config = RedisConfig(url=url, key_prefix="t:", command_timeout=0.1, connect_timeout=0.1)
    l2 = RedisStore(config, tasks, clock)
    breaker = CircuitBreaker(1, 60.0, 60.0, clock=clock)
    store = layered_store(MemoryStore(1000, 10**9, clock), l2, breaker, tasks, "i", clock)
    assert store.l1 is not None
    await store.l1.set("GET api /q/1", CachedResponse(200, (), b"x", clock(), 60.0))
    try:
        listed, cursor = await page(store, "*", None, None, 10)  # asking L2 fails: opens
        assert [(i.key, i.layers) for i in listed] == [("GET api /q/1", ("l1",))]
        assert breaker.state == "open" and l2.stats.errors == 1
        with pytest.raises(StoreUnavailable):  # the L2 walk: refused by the breaker
            await page(store, "*", None, cursor, 10)
        listed, _ = await page(store, "*", None, None, 10)
        assert [(i.key, i.layers) for i in listed] == [("GET api /q/1", ("l1",))]
        assert l2.stats.errors == 1  # Redis was not asked again
    finally:
        await l2.close()


# --- the L2 walk against a keyspace that changes under it -------------------------------

_M64 = 2**64 - 1


def _rev64(v: int) -> int:
    return int(f"{v:064b}"[::-1], 2)


class RehashingKeyspace:
    """Redis' keyspace as SCAN sees it (dict.c): a hash table of 2^n chained buckets, new keys
    at the head of their chain, visited in reverse-binary cursor order; it doubles when full
    and shrinks when `shrink` says. Only keys under `GET ` are entries; the rest (leases,
    counters, other applications' keys) still count toward COUNT, as in Redis. Deterministic:
    a key's hash is its blake2b."""

    def __init__(self, size: int, clock: ManualClock) -> None:
        self.buckets: list[list[str]] = [[] for _ in range(size)]
        self.entries: dict[str, CachedResponse] = {}
        self.clock = clock
        self.count = 0

    @staticmethod
    def _hash(key: str) -> int:
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")

    def _place(self, key: str) -> None:
        self.buckets[self._hash(key) & (len(self.buckets) - 1)].insert(0, key)

    def resize(self, size: int) -> None:
        old, self.buckets = self.buckets, [[] for _ in range(size)]
        for chain in old:
            for key in chain:
                self._place(key)

    def add(self, key: str, entry: CachedResponse | None = None) -> None:
        if entry is not None:
            self.entries[key] = entry
        self._place(key)
        self.count += 1
        if self.count > len(self.buckets):  # load factor 1: grow
            self.resize(len(self.buckets) * 2)

    async def scan_page(
        self, pattern: str, cursor: int, count: int
    ) -> tuple[int, list[tuple[str, CachedResponse]]]:
        keys: list[str] = []
        mask = len(self.buckets) - 1
        budget = count * 10
        while True:  # scanGenericCommand's loop around dictScan
            keys.extend(self.buckets[cursor & mask])
            cursor = _rev64((_rev64(cursor | (~mask & _M64)) + 1) & _M64)
            budget -= 1
            if not (cursor and budget and len(keys) < count):
                break
        glob = Glob.parse(pattern, max_length=None)
        return cursor, [(k, self.entries[k]) for k in keys if k in self.entries and glob.matches(k)]

    async def exists_many(self, keys: list[str]) -> list[bool]:
        return [k in self.entries for k in keys]


def _keyspace_store(keyspace: RehashingKeyspace, clock: ManualClock, tasks: Tasks) -> LayeredStore:
    breaker = CircuitBreaker(3, 60.0, 60.0, clock=clock)
    l1 = MemoryStore(1000, 10**9, clock)
    return LayeredStore(l1, [Guarded(keyspace, breaker)], tasks, "i", clock)  # type: ignore[arg-type]


async def _walk(store: LayeredStore, limit: int, between: Callable[[int], None]) -> list[str]:
    listed: list[str] = []
    cursor: str | None = None
    for turn in range(2000):
        items, cursor = await page(store, "*", None, cursor, limit)
        assert len(items) <= limit
        listed.extend(item.key for item in items)
        if cursor is None:
            return listed
        between(turn)
    raise AssertionError("the walk did not end")


@pytest.mark.parametrize("limit", [1, 2, 3, 7, 25])
async def test_l2_keys_listed_once_while_the_keyspace_grows_and_rehashes(
    clock: ManualClock, tasks: Tasks, limit: int
) -> None:
    # A page that ended inside a SCAN step was resumed as "the same step again, at an
    # offset"; but new keys (leases, counters, other writers) change what the same cursor
    # returns, and a rehash more so: keys were listed twice or never (1 run in 12 of the
    # test above). Here keys arrive between every two pages and the table doubles twice.
    keyspace = RehashingKeyspace(256, clock)
    entries = [f"GET api /q/{i:03d}" for i in range(200)]
    for key in entries:
        keyspace.add(key, CachedResponse(200, (), b"x", clock(), 600.0))
    store = _keyspace_store(keyspace, clock, tasks)

    def traffic(turn: int) -> None:
        for i in range(3):  # new keys at the head of their chains: steps end sooner
            keyspace.add(f"lease:{turn}:{i}")
        if turn in (1, 4):  # enough more to double the table
            while len(keyspace.buckets) < 512 * turn:
                keyspace.add(f"other:{keyspace.count}")

    listed = await _walk(store, limit, traffic)
    assert len(keyspace.buckets) >= 2048  # it rehashed mid-walk, twice or more
    assert sorted(listed) == sorted(entries)  # each key exactly once


async def test_l2_keys_are_never_missed_when_the_table_shrinks_mid_walk(
    clock: ManualClock, tasks: Tasks
) -> None:
    # A shrink makes SCAN itself return keys again (it revisits merged buckets); nothing is
    # missed, and that is all the listing promises then.
    keyspace = RehashingKeyspace(1024, clock)
    entries = [f"GET api /q/{i:03d}" for i in range(200)]
    for key in entries:
        keyspace.add(key, CachedResponse(200, (), b"x", clock(), 600.0))
    store = _keyspace_store(keyspace, clock, tasks)
    listed = await _walk(store, 3, lambda turn: keyspace.resize(256) if turn == 20 else None)
    assert set(listed) == set(entries)


class ScriptedTier:
    """A remote tier whose SCAN steps are scripted per cursor: each call takes the next
    answer for that cursor (the last one repeats)."""

    def __init__(self, steps: dict[int, list[tuple[int, list[str]]]], clock: ManualClock) -> None:
        self.steps = steps
        self.entry = CachedResponse(200, (), b"x", clock(), 600.0)

    async def scan_page(
        self, pattern: str, cursor: int, count: int
    ) -> tuple[int, list[tuple[str, CachedResponse]]]:
        answers = self.steps[cursor]
        next_cursor, keys = answers.pop(0) if len(answers) > 1 else answers[0]
        return next_cursor, [(k, self.entry) for k in keys]

    async def exists_many(self, keys: list[str]) -> list[bool]:
        return [True] * len(keys)


async def test_keys_a_split_step_listed_stay_out_when_asking_again_moves_them_later(
    clock: ManualClock, tasks: Tasks
) -> None:
    # Cursor 0 first covers a and b; asked again (a page later), it covers neither, and the
    # step after it has both: a, listed from the first answer, must not come again.
    tier = ScriptedTier({0: [(0, ["a", "b"]), (5, [])], 5: [(0, ["b", "a"])]}, clock)
    store = _keyspace_store(tier, clock, tasks)  # type: ignore[arg-type]
    assert await _walk(store, 1, lambda turn: None) == ["a", "b"]


async def test_l2_keys_listed_once_while_other_writers_grow_redis_between_pages(
    redis_proc: RedisServer, clock: ManualClock, tasks: Tasks
) -> None:
    # The same on a real Redis of this test's own: between pages, a few unrelated keys land
    # in its chains, and every 40 pages enough to double its keyspace (Redis rehashes into a
    # table twice the size). Its hash seed is random: the old cursors failed 10 runs in 12.
    config = RedisConfig(url=redis_proc.url, key_prefix="t:", command_timeout=1.0)
    l2 = RedisStore(config, tasks, clock)
    breaker = CircuitBreaker(3, 60.0, 60.0, clock=clock)
    store = layered_store(MemoryStore(1000, 10**9, clock), l2, breaker, tasks, "i", clock)
    entries = [f"GET api /q/{i:03d}" for i in range(120)]
    try:
        for key in entries:
            await l2.set(key, CachedResponse(200, (), b"x", clock(), 600.0))
        written = 0
        listed: list[str] = []
        cursor: str | None = None
        for turn in range(1000):  # about 160 pages
            items, cursor = await page(store, "*", None, cursor, 2)
            listed.extend(item.key for item in items)
            if cursor is None:
                break
            size = written + len(entries)
            batch = size if turn % 40 == 0 and size < 2000 else 3  # double it now and then
            await l2.client.mset({f"other:{written + i}": b"" for i in range(batch)})
            written += batch
        assert cursor is None
        assert written >= 1500  # doubled four times
        assert sorted(listed) == sorted(entries)  # each key exactly once
    finally:
        await l2.close()


async def test_a_walk_ends_even_when_one_step_holds_more_than_a_cursor_remembers(
    clock: ManualClock, tasks: Tasks
) -> None:
    # A cursor remembers MAX_PENDING listed keys; beyond that, the rest of the step is
    # skipped rather than the same keys listed round and round.
    keys = [f"k{i:03d}" for i in range(MAX_PENDING + 10)]
    store = _keyspace_store(ScriptedTier({0: [(0, keys)]}, clock), clock, tasks)  # type: ignore[arg-type]
    listed = await _walk(store, 1, lambda turn: None)
    assert listed == keys[: MAX_PENDING + 1]


async def test_a_cursor_forgets_the_oldest_keys_gone_from_its_step_first(
    clock: ManualClock, tasks: Tasks
) -> None:
    # Keys listed from a split step and then removed are never seen again; they must not
    # crowd out the keys of the step at hand (y, without which z would be skipped).
    gone = [f"g{i:03d}" for i in range(MAX_PENDING)]
    first = (0, [*gone, "z"])  # asked twice: with COUNT 48, then with COUNT 1
    steps = {0: [first, first, (7, [])], 7: [(0, ["y", "z"])]}
    store = _keyspace_store(ScriptedTier(steps, clock), clock, tasks)  # type: ignore[arg-type]
    cursor: str | None = None
    listed: list[str] = []
    while True:
        items, cursor = await page(store, "*", None, cursor, MAX_PENDING if not listed else 1)
        listed.extend(item.key for item in items)
        if cursor is None:
            break
    assert listed == [*gone, "y", "z"]
