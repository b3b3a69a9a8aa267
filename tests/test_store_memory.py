"""proxy/store/memory.py: the L1 LRU, bounded by entries and bytes, with lazy expiry."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections import Counter

import pytest
from conftest import CountingUpstream, ProxyFactory, Reply

from proxy.clock import ManualClock
from proxy.entry import ENTRY_OVERHEAD, CachedResponse
from proxy.glob import Glob
from proxy.store.base import StoreStats
from proxy.store.memory import MAX_SWEEPS, MemoryStore, cost

BIG = 10**9


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def entry(
    clock: ManualClock,
    body: bytes = b"x",
    ttl: float = 60.0,
    headers: tuple[tuple[str, str], ...] = (),
) -> CachedResponse:
    return CachedResponse(status=200, headers=headers, body=body, stored_at=clock(), ttl=ttl)


async def keys_of(store: MemoryStore, pattern: str = "*") -> list[str]:
    return [k async for k, _ in store.scan(pattern)]


def test_entry_size_counts_body_and_headers(clock: ManualClock) -> None:
    e = entry(clock, body=b"x" * 100, headers=(("Content-Type", "application/json"),))
    header = len("Content-Type") + len("application/json")
    # The header text twice: as pairs, and serialized for hits (with ": " and CRLF).
    assert e.size == 100 + 2 * header + 4 + ENTRY_OVERHEAD


async def test_lru_by_entry_count(clock: ManualClock) -> None:
    store = MemoryStore(max_entries=2, max_bytes=BIG, clock=clock)
    for k in ("a", "b", "c"):
        await store.set(k, entry(clock))
    assert await keys_of(store) == ["b", "c"]
    assert len(store) == 2
    assert store.stats.evictions == 1
    assert store.bytes == cost("b", entry(clock)) + cost("c", entry(clock))


async def test_get_refreshes_recency(clock: ManualClock) -> None:
    store = MemoryStore(max_entries=2, max_bytes=BIG, clock=clock)
    await store.set("a", entry(clock))
    await store.set("b", entry(clock))
    assert await store.get("a") is not None
    await store.set("c", entry(clock))
    assert await keys_of(store) == ["a", "c"]
    assert await store.get("b") is None


async def test_lru_by_bytes_counts_body_and_headers(clock: ManualClock) -> None:
    def c(e: CachedResponse) -> int:
        return cost("k", e)  # every key here is one character: the same cost

    small = entry(clock, body=b"x" * 100)
    heavy = entry(clock, body=b"x" * 100, headers=(("X-Pad", "p" * 50),))  # same body
    limit = 4 * c(small) + 10

    plain = MemoryStore(max_entries=1000, max_bytes=limit, clock=clock)
    for k in ("a", "b", "c", "d"):
        await plain.set(k, small)
    assert len(plain) == 4
    assert plain.stats.evictions == 0

    # The same body with headers no longer fits: headers count, so the oldest must go.
    store = MemoryStore(max_entries=1000, max_bytes=limit, clock=clock)
    for k in ("a", "b", "c"):
        await store.set(k, small)
    await store.set("d", heavy)
    assert await keys_of(store) == ["b", "c", "d"]
    assert store.bytes == 2 * c(small) + c(heavy)
    assert store.stats.evictions == 1

    # A bigger entry evicts as many as it takes, oldest first.
    big = entry(clock, body=b"x" * (c(small) + 100))  # costs 2 * c(small)
    assert c(big) == 2 * c(small)
    await store.set("e", big)
    assert await keys_of(store) == ["d", "e"]
    assert store.bytes == c(heavy) + c(big) <= store.max_bytes
    assert store.stats.evictions == 3


async def test_replacing_a_key_keeps_byte_accounting_exact(clock: ManualClock) -> None:
    store = MemoryStore(max_entries=10, max_bytes=BIG, clock=clock)
    first = entry(clock, body=b"x" * 100)
    second = entry(clock, body=b"y" * 500)
    await store.set("k", first)
    await store.set("k", second)
    assert len(store) == 1
    assert store.bytes == cost("k", second)
    got = await store.get("k")
    assert got is not None
    assert got.body == b"y" * 500
    await store.set("k", first)
    assert store.bytes == cost("k", first)
    assert store.stats.sets == 3
    assert store.stats.evictions == 0
    assert await store.delete("k")
    assert store.bytes == 0


async def test_replacing_moves_the_key_to_most_recent(clock: ManualClock) -> None:
    store = MemoryStore(max_entries=2, max_bytes=BIG, clock=clock)
    await store.set("a", entry(clock))
    await store.set("b", entry(clock))
    await store.set("a", entry(clock, body=b"new"))
    await store.set("c", entry(clock))
    assert await keys_of(store) == ["a", "c"]


async def test_entry_bigger_than_max_bytes_is_not_stored(clock: ManualClock) -> None:
    store = MemoryStore(max_entries=10, max_bytes=1000, clock=clock)
    await store.set("small", entry(clock))
    huge = entry(clock, body=b"x" * 1000)
    assert cost("huge", huge) > store.max_bytes
    await store.set("huge", huge)
    assert await store.get("huge") is None
    assert await keys_of(store) == ["small"]  # and nothing was evicted to make room
    assert store.bytes == cost("small", entry(clock))
    assert store.stats.sets == 1
    assert store.stats.evictions == 0


async def test_entry_exactly_max_bytes_is_stored(clock: ManualClock) -> None:
    exact = entry(clock, body=b"x" * 800)
    store = MemoryStore(max_entries=10, max_bytes=cost("k", exact), clock=clock)
    await store.set("k", exact)
    assert await store.get("k") == exact
    assert store.bytes == store.max_bytes


async def test_oversized_replacement_does_not_leave_the_old_entry(clock: ManualClock) -> None:
    # Store.set: "Store entry under key ... (replacing any older one)". An entry too big to
    # keep must not leave the previous response under the key to be served later.
    store = MemoryStore(max_entries=10, max_bytes=1000, clock=clock)
    await store.set("k", entry(clock, body=b"old"))
    await store.set("k", entry(clock, body=b"x" * 1000))
    assert await store.get("k") is None


async def test_lazy_expiry(clock: ManualClock) -> None:
    store = MemoryStore(max_entries=10, max_bytes=BIG, clock=clock)
    e = entry(clock, ttl=10)
    await store.set("k", e)
    clock.advance(9.999)
    assert await store.get("k") == e
    assert len(store) == 1
    clock.advance(0.001)  # expires_at is exclusive
    assert await store.get("k") is None
    assert len(store) == 0
    assert store.bytes == 0
    assert store.stats == StoreStats(hits=1, misses=1, sets=1, expirations=1)


async def test_expired_entries_stay_until_touched(clock: ManualClock) -> None:
    store = MemoryStore(max_entries=10, max_bytes=BIG, clock=clock)
    await store.set("k", entry(clock, ttl=1))
    clock.advance(5)
    assert len(store) == 1  # lazy: nothing happens until the key is touched
    assert store.stats.expirations == 0
    assert store.peek("k") is None
    assert len(store) == 0
    assert store.stats.expirations == 1


async def test_counters_are_exact(clock: ManualClock) -> None:
    store = MemoryStore(max_entries=2, max_bytes=BIG, clock=clock)
    await store.set("a", entry(clock))  # set
    await store.set("b", entry(clock))  # set
    assert await store.get("a") is not None  # hit
    assert await store.get("zzz") is None  # miss
    await store.set("c", entry(clock))  # set, evicts b
    assert await store.get("b") is None  # miss
    assert await store.delete("a")  # delete
    assert not await store.delete("a")  # nothing to delete: not counted
    await store.set("a", entry(clock))  # set
    assert await store.get("a") is not None  # hit
    assert await store.get("c") is not None  # hit
    assert store.stats == StoreStats(
        hits=3, misses=2, sets=4, deletes=1, evictions=1, expirations=0
    )


async def test_delete_matching_with_glob(clock: ManualClock) -> None:
    store = MemoryStore(max_entries=10, max_bytes=BIG, clock=clock)
    keys = [
        "GET api /v8/finance/chart/AAPL?range=5d",
        "GET api /v8/finance/chart/MSFT",
        "GET api /quote/AAPL",
        "GET other /v8/finance/chart/AAPL accept-language=en",
    ]
    for k in keys:
        await store.set(k, entry(clock))
    assert await store.delete_matching("* * /v8/finance/chart/*") == 3
    assert await keys_of(store) == ["GET api /quote/AAPL"]
    assert store.bytes == cost("GET api /quote/AAPL", entry(clock))
    assert store.stats.deletes == 3
    assert await store.delete_matching("nothing*") == 0
    assert store.stats.deletes == 3


async def test_clear(clock: ManualClock) -> None:
    store = MemoryStore(max_entries=10, max_bytes=BIG, clock=clock)
    for k in ("a", "b", "c"):
        await store.set(k, entry(clock))
    assert await store.clear() == 3
    assert len(store) == 0
    assert store.bytes == 0
    assert await keys_of(store) == []
    assert store.stats.deletes == 3
    assert await store.clear() == 0


async def test_scan_skips_expired_and_filters_by_glob(clock: ManualClock) -> None:
    store = MemoryStore(max_entries=10, max_bytes=BIG, clock=clock)
    await store.set("GET api /a", entry(clock, ttl=5))
    await store.set("GET api /b", entry(clock, ttl=50))
    await store.set("GET api /c", entry(clock, ttl=50))
    clock.advance(10)
    assert await keys_of(store) == ["GET api /b", "GET api /c"]
    assert await keys_of(store, "* * /c") == ["GET api /c"]
    assert await keys_of(store, "* * /[ab]") == ["GET api /b"]
    # scanning is not a lookup
    assert store.stats.hits == 0
    assert store.stats.misses == 0


async def test_scan_tolerates_changes_while_iterating(clock: ManualClock) -> None:
    store = MemoryStore(max_entries=10, max_bytes=BIG, clock=clock)
    for k in ("a", "b", "c"):
        await store.set(k, entry(clock))
    seen = []
    async for k, _ in store.scan():
        seen.append(k)
        await store.delete(k)
    assert seen == ["a", "b", "c"]
    assert len(store) == 0


async def test_byte_limit_bounds_the_memory_entries_really_hold(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    # Quote-sized entries made by the real pipeline from real aiohttp responses, far more
    # than fit. Counting only body and header text (plus a flat 200 B), L1 held ~3x its
    # limit in Python objects; the limit must bound what the entries really hold.
    limit = 500_000
    proxy = await make_proxy(
        cache={"backend": "memory", "l1": {"max_entries": 100_000, "max_memory": limit}}
    )
    paths = [f"/quote/S{i:05d}" for i in range(1500)]
    for i, path in enumerate(paths):
        body = b'{"symbol": "S%05d", "price": 189.25, "pad": "%s"}' % (i, b"x" * 150)
        upstream.replies[path] = Reply(body=body, headers={
            "Content-Type": "application/json", "Cache-Control": "max-age=60",
            "ETag": f'"{i:08x}"', "Last-Modified": "Tue, 24 Nov 2026 06:41:00 GMT",
        })  # fmt: skip
    tracemalloc.start()
    try:
        for start in range(0, len(paths), 50):
            batch = paths[start : start + 50]
            for _ in range(2):  # a miss stores each one, a hit serializes its head (wire)
                replies = await asyncio.gather(*(proxy.client.get(p) for p in batch))
                for reply in replies:
                    assert reply.status == 200
                    await reply.read()
                    reply.release()
                del replies
        assert proxy.l1.stats.evictions > 0  # the limit was reached
        gc.collect()
        with_entries = tracemalloc.get_traced_memory()[0]
        proxy.l1.drop_all()
        gc.collect()
        held = with_entries - tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held <= limit
    assert held >= 0.75 * limit  # an honest estimate, not a needlessly small cache


def test_cost_counts_each_header_tag_and_key_character(clock: ManualClock) -> None:
    plain = entry(clock, body=b"x" * 100)
    base = cost("k", plain) - plain.size
    two_headers = entry(clock, body=b"x" * 100, headers=(("A", "1"), ("B", "2")))
    assert cost("k", two_headers) - two_headers.size > base  # each header is an object too
    tagged = CachedResponse(200, (), b"x" * 100, clock(), 60.0, tags=("symbol=AAPL",))
    assert cost("k", tagged) > cost("k", plain) + len("symbol=AAPL")
    assert cost("k" * 11, plain) == cost("k", plain) + 10


# --- pattern purges walk L1 in slices (issue 11, finding 1) -----------------------------


async def test_a_pattern_purge_lets_the_loop_run_while_it_walks(clock: ManualClock) -> None:
    # A glob costs up to len(key) * len(glob) per key: over 1000 keys of 8 KB a dense
    # pattern took seconds in one go. The walk now yields between slices of CPU time; with
    # a slice of 0 it yields after every key, so another task runs in the middle of it.
    store = MemoryStore(max_entries=1000, max_bytes=BIG, clock=clock)
    for i in range(100):
        await store.set(f"GET api /q/{i}", entry(clock))
    seen: list[int] = []

    async def watch() -> None:
        while len(store):
            seen.append(len(store))
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    removed = await store.sweep(Glob.parse("GET api /q/*"), slice_seconds=0.0)
    await watcher
    assert removed == 100 and len(store) == 0
    assert any(0 < n < 100 for n in seen), seen  # it ran while the walk was half done


async def test_while_a_pattern_purge_walks_its_entries_are_already_gone(
    clock: ManualClock,
) -> None:
    store = MemoryStore(max_entries=1000, max_bytes=BIG, clock=clock)
    for key in ("GET api /q/a", "GET api /q/b", "GET api /other"):
        await store.set(key, entry(clock))
    walk = store.sweep(Glob.parse("GET api /q/*"))  # asked for, not yet walked
    assert store.peek("GET api /q/a") is None  # what the purge removes is gone at once
    assert store.peek("GET api /other") is not None
    await store.set("GET api /q/b", entry(clock, body=b"new"))  # stored after the purge
    assert await walk == 1  # /q/a went at lookup, /q/b's old entry was replaced
    assert store.peek("GET api /q/b") == entry(clock, body=b"new")  # the new one stays
    assert sorted(k for k, _ in store.items()) == ["GET api /other", "GET api /q/b"]


async def test_delete_matching_walks_in_slices_too(clock: ManualClock) -> None:
    store = MemoryStore(max_entries=1000, max_bytes=BIG, clock=clock)
    for i in range(3):
        await store.set(f"k{i}", entry(clock))
    assert await store.delete_matching("k*") == 3
    assert store.stats.deletes == 3 and len(store) == 0


# --- at most MAX_SWEEPS walks at once (issue 11 review, finding 6) ----------------------


async def test_beyond_max_sweeps_a_sweep_is_refused_and_a_purge_waits_its_turn(
    clock: ManualClock,
) -> None:
    # Each walk holds a copy of L1's index and costs every lookup a match: 200 at once over
    # 50k entries held the loop 4.4 s and 368 MB. Beyond the cap, sweep() says None (the
    # backplane then distrusts L1) and delete_matching waits for a walk to end.
    store = MemoryStore(max_entries=1000, max_bytes=BIG, clock=clock)
    for i in range(10):
        await store.set(f"k{i}", entry(clock))
    walks = [store.sweep(Glob.parse(f"k{i}"), slice_seconds=0.0) for i in range(MAX_SWEEPS)]
    assert all(walk is not None for walk in walks)
    assert store.sweep(Glob.parse("k8")) is None  # refused: nothing forgotten
    assert store.peek("k8") is not None

    purge = asyncio.ensure_future(store.delete_matching("k9"))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not purge.done() and store.peek("k9") is not None  # waiting for a place
    first = walks.pop()
    assert first is not None
    assert await first == 1  # one walk ends: its place goes to the waiting purge ...
    assert store.sweep(Glob.parse("k7")) is None  # ... not to a sweep asked for meanwhile
    assert await purge == 1 and store.peek("k9") is None
    assert [await walk for walk in walks if walk is not None] == [1] * (MAX_SWEEPS - 1)
    assert sorted(k for k, _ in store.items()) == ["k4", "k5", "k6", "k7", "k8"]


async def test_a_sweep_matches_each_key_once_whether_its_walk_or_a_lookup_asks(
    clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every lookup matched its key against every walking sweep's glob: with four dense globs
    # walking, each hit on an 8 KB key cost 63 ms (issue 11 second review, finding 2). Now a
    # sweep remembers its verdict per key, shared by its walk and lookups.
    calls: Counter[str] = Counter()
    matches = Glob.matches

    passed = asyncio.Event()

    def counted(glob: Glob, key: str) -> bool:
        calls[key] += 1
        if key == "GET api /other/0":
            passed.set()
        return matches(glob, key)

    monkeypatch.setattr(Glob, "matches", counted)
    store = MemoryStore(max_entries=1000, max_bytes=BIG, clock=clock)
    keys = [f"GET api /q/{i}" for i in range(50)] + [f"GET api /other/{i}" for i in range(50)]
    for key in keys:
        await store.set(key, entry(clock))
    walk = store.sweep(Glob.parse("GET api /q/*"), slice_seconds=0.0)
    assert walk is not None
    for _ in range(5):  # looked up before the walk reaches them
        assert store.peek("GET api /other/7") is not None
        assert store.peek("GET api /q/7") is None
    walking = asyncio.ensure_future(walk)
    await passed.wait()  # the walk has matched it ...
    assert not walking.done()
    for _ in range(5):  # ... and lookups meanwhile take its verdict
        assert store.peek("GET api /other/0") is not None
    assert await walking == 50
    assert set(calls) == set(keys)
    assert set(calls.values()) == {1}, calls.most_common(3)
