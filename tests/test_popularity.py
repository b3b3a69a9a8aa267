"""Popularity counts stay bounded: in keys, in key length, in process and in Redis, and only
requests answered from a stored entry count (issue 11, finding 11)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from conftest import (
    CountingUpstream,
    RedisServer,
    _free_port,
    base_config,
    layered_cache,
    layered_store,
    spawn_serve,
)

from proxy.breaker import CircuitBreaker
from proxy.clock import ManualClock
from proxy.config import RedisConfig
from proxy.popularity import MAX_KEY_LENGTH, POPULAR_KEEP, Popularity
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore
from proxy.tasks import Tasks

# --- in process ---------------------------------------------------------------------------


def test_the_counter_keeps_its_bound_and_the_busiest_keys() -> None:
    popular = Popularity(limit=100)
    for _ in range(50):
        popular.count("hot")
    for i in range(10_000):
        popular.count(f"cold{i}")
        assert len(popular) <= 100
    assert popular.most_common(1) == [("hot", 50)]  # not aged: these counts go to L2


def test_aging_halves_what_survives_a_trim() -> None:
    popular = Popularity(limit=10, aging=True)
    for _ in range(40):
        popular.count("hot")
    for i in range(10):
        popular.count(f"cold{i}")
    assert popular.most_common(1) == [("hot", 21)]


def test_overlong_keys_are_not_counted() -> None:
    popular = Popularity()
    popular.count("k" * MAX_KEY_LENGTH)
    popular.count("k" * (MAX_KEY_LENGTH + 1))
    assert popular.take(10) == {"k" * MAX_KEY_LENGTH: 1}
    assert len(popular) == 0


# --- in Redis -----------------------------------------------------------------------------


@pytest.fixture
async def l2(redis_proc: RedisServer, tasks: Tasks) -> Any:
    config = RedisConfig(url=redis_proc.url, key_prefix="pop:", command_timeout=5.0)
    store = RedisStore(config, tasks, ManualClock())
    yield store
    await store.close()


async def test_the_set_never_exceeds_its_bound_after_any_flush(l2: RedisStore) -> None:
    # Before: trimmed every 100th flush only, so 12 flushes of 1,000 new keys left 12,000.
    await l2.add_popularity({"hot": 1_000_000})
    for flush in range(12):
        await l2.add_popularity({f"f{flush}-k{i}": 1 for i in range(1_000)})
        assert await l2.client.zcard(l2.popular) <= POPULAR_KEEP
    assert (await l2.hottest(1))[0][0] == "hot"  # the least requested go first


async def test_overlong_members_never_reach_the_set(l2: RedisStore) -> None:
    await l2.add_popularity({"k" * 8_000: 5, "short": 1})
    members = await l2.client.zrange(l2.popular, 0, -1)
    assert members == [b"short"]
    assert max(len(m) for m in members) <= MAX_KEY_LENGTH


async def test_a_layered_store_flush_is_bounded_in_keys_and_length(
    l2: RedisStore, tasks: Tasks
) -> None:
    store = layered_store(MemoryStore(100, 1 << 20), l2, CircuitBreaker(3, 0.5, 30.0), tasks, "a")
    for i in range(30_000):  # between two flushes
        store.popularity.count(f"GET api /q/{i:05}" + "x" * (i % 2) * MAX_KEY_LENGTH)
    assert len(store.popularity._counts) <= POPULAR_KEEP
    await store.popularity.flush()
    assert 0 < await l2.client.zcard(l2.popular) <= POPULAR_KEEP
    assert all(len(k) <= MAX_KEY_LENGTH for k, _ in await l2.hottest(POPULAR_KEEP))


# --- a real `cacheproxy serve` against a down upstream -------------------------------------


async def test_requests_that_end_in_errors_are_not_counted(
    upstream: CountingUpstream, redis_proc: RedisServer, tmp_path: Path
) -> None:
    prefix = "popserve:"
    cache = layered_cache(redis_proc.url, prefix, popularity_flush="50ms")
    data = base_config(upstream.url, cache=cache)
    # A second upstream that refuses every connection, and a cached route in front of it.
    data["upstreams"]["down"] = {"url": f"http://127.0.0.1:{_free_port()}", "retries": 0,
                                 "breaker_failures": 1_000_000}  # fmt: skip
    data["routes"].append({"name": "dead", "path": "/dead/{id}", "upstream": "down",
                           "ttl_class": "short"})  # fmt: skip
    served = await spawn_serve(data, tmp_path)
    client = aioredis.from_url(redis_proc.url)
    try:
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{served.port}"
            for _ in range(500):  # the process starting up
                try:
                    async with session.get(base + "/quote/GOOD") as resp:
                        assert resp.status == 200
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.02)  # waiting for another process, not for time
            for i in range(200):
                async with session.get(f"{base}/dead/{i}") as resp:
                    assert resp.status == 502
            async with session.get(base + "/quote/GOOD") as resp:
                assert resp.status == 200  # a hit: counted
            goal = 2.0  # the stored miss and the hit

            async def score() -> float | None:
                return await client.zscore(prefix + "popular", "GET api /quote/GOOD")

            for _ in range(500):  # flushes are every 50 ms in that process
                if await score() == goal:
                    break
                await asyncio.sleep(0.02)  # waiting for another process, not for time
            assert await score() == goal
            # Counted before the last hit, so flushed with it or earlier: none were counted.
            assert await client.zrange(prefix + "popular", 0, -1) == [b"GET api /quote/GOOD"]
    finally:
        await client.aclose()
        served.process.kill()
        await served.process.wait()


async def test_hits_and_stored_misses_are_counted_errors_are_not(
    make_proxy: Any, upstream: CountingUpstream
) -> None:
    config = base_config(upstream.url)
    upstreams = {**config["upstreams"], "down": {"url": f"http://127.0.0.1:{_free_port()}",
                                                 "retries": 0}}  # fmt: skip
    routes = [*config["routes"], {"name": "dead", "path": "/dead/{id}", "upstream": "down",
                                  "ttl_class": "short"}]  # fmt: skip
    proxy = await make_proxy(upstreams=upstreams, routes=routes)  # memory: counted in process
    assert (await proxy.client.get("/quote/A")).status == 200  # a miss that stored
    assert (await proxy.client.get("/quote/A")).status == 200  # a hit
    assert (await proxy.client.get("/dead/B")).status == 502
    assert await proxy.deps.store.popularity.hottest(10) == [("GET api /quote/A", 2.0)]


async def test_background_refreshes_are_not_requests(
    make_proxy: Any, upstream: CountingUpstream
) -> None:
    # The one fetcher (misses, refreshes, warm start) counted every store: a refresh no client
    # asked for made its key look busier, and warm start reads the counts back.
    short = {"ttl": 60, "stale_while_revalidate": 60}
    proxy = await make_proxy(ttl_classes={"short": short, "long": "1h"})
    path = "/v8/finance/chart/AAPL"
    assert (await proxy.client.get(path)).status == 200  # a miss that stored: 1
    proxy.clock.advance(61)
    stale = await proxy.client.get(path)  # a stale hit: 2, and a background refresh
    assert "stale-while-revalidate" in stale.headers["Cache-Status"]
    await proxy.deps.tasks.wait()
    assert upstream.calls[path] == 2  # the refresh went upstream and stored
    assert await proxy.deps.store.popularity.hottest(5) == [(f"GET api {path}", 2.0)]
