"""GET /keys pagination: every key exactly once, across L1 and L2; filters; redaction."""

from __future__ import annotations

import asyncio
import base64
import socket
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
from proxy.listing import page
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


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage",
        "WyJsMyIsIDBd",
        "WyJsMiIsICJ4Il0",
        base64.urlsafe_b64encode(b"[" * 5000).decode(),  # a RecursionError: 500 before
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
