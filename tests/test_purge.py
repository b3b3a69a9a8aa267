"""Purge by tag and route (lazy, by timestamp), soft purge, and DELETE /keys, across
instances sharing a real Redis."""

from __future__ import annotations

from conftest import CountingUpstream, ProxyFactory, RedisServer, Reply, eventually, layered_cache
from test_layered import connected

PATHS = ("/quote/AAPL", "/v8/finance/chart/AAPL", "/quote/MSFT")


async def test_a_tag_purge_reaches_every_instance_and_every_layer(
    make_proxy: ProxyFactory, upstream: CountingUpstream, redis_server: RedisServer
) -> None:
    cache = layered_cache(redis_server.url)
    a, b = await make_proxy(cache=cache), await make_proxy(cache=cache)
    await connected(a, b)
    for path in (*PATHS, "/v8/finance/chart/AAPL?range=1y"):
        await b.client.get(path)
    await b.deps.store.flush()
    a.clock.advance(1)
    answer = await (await a.admin.post("/purge", json={"tag": "symbol=AAPL"})).json()
    assert answer["l2"] == "lazy"
    # b records the ban; its L1 is not walked (that costs O(L1) per message): lookups apply it.
    await eventually(lambda: "symbol=AAPL" in b.deps.store.bans.hard.times)
    b.clock.advance(2)  # one wall clock in production; here each instance has its own
    for path in PATHS:
        response = await b.client.get(path)
        purged = "AAPL" in path
        assert response.headers["Cache-Status"].startswith(
            "cacheproxy; fwd=miss" if purged else "cacheproxy; hit"
        ), path
    await b.deps.store.flush()
    # A new instance finds the ban in Redis: only entries stored after it are served.
    calls = upstream.total
    late = await make_proxy(cache=cache)
    late.clock.advance(2)
    fresh = await late.client.get("/v8/finance/chart/AAPL")
    assert fresh.headers["Cache-Status"].endswith("detail=l2")  # b's refetch, after the purge
    assert upstream.total == calls
    banned = await late.client.get("/v8/finance/chart/AAPL?range=1y")  # in L2, from before
    assert banned.headers["Cache-Status"] == "cacheproxy; fwd=miss; stored"
    assert upstream.total == calls + 1


async def test_a_route_purge_drops_that_route_only(
    make_proxy: ProxyFactory, upstream: CountingUpstream, redis_server: RedisServer
) -> None:
    proxy = await make_proxy(cache=layered_cache(redis_server.url))
    for path in PATHS:
        await proxy.client.get(path)
    proxy.clock.advance(1)
    answer = await (await proxy.admin.post("/purge", json={"route": "quote"})).json()
    assert answer["purged"] == 2
    assert set(proxy.l1_keys()) == {"GET api /v8/finance/chart/AAPL"}
    assert "fwd=miss" in (await proxy.client.get("/quote/MSFT")).headers["Cache-Status"]


async def test_soft_purge_refetches_but_keeps_the_entry_for_an_outage(
    make_proxy: ProxyFactory, upstream: CountingUpstream, redis_server: RedisServer
) -> None:
    proxy = await make_proxy(cache=layered_cache(redis_server.url))
    upstream.replies["/quote/AAPL"] = Reply(body=b'{"v": 1}')
    await proxy.client.get("/quote/AAPL")
    proxy.clock.advance(1)
    soft = await proxy.admin.post("/purge", json={"tag": "symbol=AAPL", "soft": True})
    assert (await soft.json())["soft"] is True
    assert "GET api /quote/AAPL" in proxy.l1  # soft: still held
    upstream.replies["/quote/AAPL"] = Reply(status=503, body=b"down")  # and now an outage
    during = await proxy.client.get("/quote/AAPL")
    assert during.status == 200
    assert await during.read() == b'{"v": 1}'
    assert during.headers["Cache-Status"].endswith("detail=stale-if-error")
    upstream.replies["/quote/AAPL"] = Reply(body=b'{"v": 2}')  # healthy again: refetched
    after = await proxy.client.get("/quote/AAPL")
    assert after.headers["Cache-Status"] == "cacheproxy; fwd=miss; stored"
    assert await after.read() == b'{"v": 2}'


async def test_tag_purge_with_the_memory_backend(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy()
    for path in PATHS:
        await proxy.client.get(path)
    proxy.clock.advance(1)
    answer = await (await proxy.admin.post("/purge", json={"tag": "symbol=AAPL"})).json()
    assert answer["purged"] == 2 and answer["l2"] is None
    assert set(proxy.l1_keys()) == {"GET api /quote/MSFT"}


async def test_delete_keys_by_pattern(make_proxy: ProxyFactory, upstream: CountingUpstream) -> None:
    proxy = await make_proxy()
    for path in PATHS:
        await proxy.client.get(path)
    answer = await (await proxy.admin.delete("/keys/quote/*")).json()
    assert answer["purged"] == 2
    assert set(proxy.l1_keys()) == {"GET api /v8/finance/chart/AAPL"}


async def test_a_pattern_too_long_to_match_is_a_bad_request_everywhere(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    # Matching costs up to len(key) * len(glob): each entry point caps the glob (issue 11, 1).
    proxy = await make_proxy()
    await proxy.client.get("/quote/AAPL")
    longest = "/quote/" + "*" * (1024 - len("/quote/"))
    too_long = longest + "*"
    for answer in (
        await proxy.admin.get("/keys", params={"pattern": too_long}),
        await proxy.admin.delete("/keys" + too_long),
        await proxy.admin.post("/purge", json={"pattern": too_long}),
    ):
        assert answer.status == 400
        detail = (await answer.json())["detail"]
        assert detail == "pattern: at most 1024 characters (this one has 1025)"
    assert len(proxy.l1) == 1
    listed = await (await proxy.admin.get("/keys", params={"pattern": longest})).json()
    assert [item["url"] for item in listed["keys"]] == ["/quote/AAPL"]
    assert (await (await proxy.admin.delete("/keys" + longest)).json())["purged"] == 1


async def test_key_route_and_soft_purges_reach_the_other_instance(
    make_proxy: ProxyFactory, upstream: CountingUpstream, redis_server: RedisServer
) -> None:
    cache = layered_cache(redis_server.url)
    a, b = await make_proxy(cache=cache), await make_proxy(cache=cache)
    await connected(a, b)
    for path in PATHS:
        await b.client.get(path)
    await b.deps.store.flush()
    assert len(b.l1) == 3

    await a.admin.post("/purge", json={"key": "GET api /quote/MSFT"})
    await eventually(lambda: "GET api /quote/MSFT" not in b.l1)

    a.clock.advance(1)
    b.clock.advance(1)
    await a.admin.post("/purge", json={"route": "chart", "soft": True})
    await eventually(lambda: b.deps.store.bans.soft.times.get("route=chart", 0) > 0)
    assert "GET api /v8/finance/chart/AAPL" in b.l1  # soft: kept ...
    upstream.replies["/v8/finance/chart/AAPL"] = Reply(status=503, body=b"down")
    during = await b.client.get("/v8/finance/chart/AAPL")  # ... for the outage
    assert during.headers["Cache-Status"].endswith("detail=stale-if-error")

    await a.admin.post("/purge", json={"route": "quote"})
    await eventually(lambda: "route=quote" in b.deps.store.bans.hard.times)
    upstream.replies["/quote/AAPL"] = Reply(body=b"new")  # the outage is over
    after = await b.client.get("/quote/AAPL")  # the ban applies at lookup
    assert after.headers["Cache-Status"] == "cacheproxy; fwd=miss; stored"
    assert await after.read() == b"new"


async def test_tags_hold_decoded_values(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy()
    await proxy.client.get("/quote/%5EGSPC")
    proxy.clock.advance(1)
    answer = await (await proxy.admin.post("/purge", json={"tag": "symbol=^GSPC"})).json()
    assert answer["purged"] == 1
    assert len(proxy.l1) == 0


async def test_purged_entries_are_not_listed_and_not_handed_to_waiters(
    make_proxy: ProxyFactory, upstream: CountingUpstream, redis_server: RedisServer
) -> None:
    cache = layered_cache(redis_server.url)
    proxy = await make_proxy(cache=cache)
    await proxy.client.get("/quote/AAPL")
    await proxy.deps.store.flush()
    proxy.clock.advance(1)
    await proxy.admin.post("/purge", json={"tag": "symbol=AAPL"})
    listing = await (await proxy.admin.get("/keys")).json()
    assert listing["keys"] == []
    store = proxy.deps.store
    assert await store.shared.acquire_lease("GET api /quote/AAPL", "other", 10)
    assert await store.leases.wait_for_l2("GET api /quote/AAPL", 0.2, float("-inf")) is None


async def test_a_url_purge_reaches_every_variant_without_scanning_l2(
    make_proxy: ProxyFactory, upstream: CountingUpstream, redis_proc: RedisServer
) -> None:
    # The variants (key-header variants, cached POST bodies) used to be purged by a glob: a
    # SCAN of all of L2 per URL purge, and a glob too long for other instances to match when
    # the URL was long. Now a URL ban, as an unsafe request makes (review of issue 11).
    from redis.asyncio import Redis

    routes = [{"name": "quote", "path": "/quote/{symbol}", "upstream": "api",
               "ttl_class": "long", "key_headers": ["Accept-Language"]}]  # fmt: skip
    proxy = await make_proxy(cache=layered_cache(redis_proc.url), routes=routes)
    languages = ("en", "de", None)
    for language in languages:
        headers = {"Accept-Language": language} if language else {}
        await proxy.client.get("/quote/AAPL", headers=headers)
        await proxy.client.get("/quote/MSFT", headers=headers)
    await proxy.deps.store.flush()
    client = Redis.from_url(redis_proc.url)
    try:
        before = (await client.info("commandstats")).get("cmdstat_scan", {}).get("calls", 0)
        proxy.clock.advance(1)
        answer = await (await proxy.admin.post("/purge", json={"url": "/quote/AAPL"})).json()
        after = (await client.info("commandstats")).get("cmdstat_scan", {}).get("calls", 0)
    finally:
        await client.aclose()
    assert answer["layers"] == {"l1": 1, "l2": 1}  # the plain GET at once; variants lazily
    assert after == before  # no SCAN
    calls = upstream.total
    for language in languages:
        headers = {"Accept-Language": language} if language else {}
        aapl = await proxy.client.get("/quote/AAPL", headers=headers)
        assert aapl.headers["Cache-Status"] == "cacheproxy; fwd=miss; stored", language
        msft = await proxy.client.get("/quote/MSFT", headers=headers)
        assert msft.headers["Cache-Status"].startswith("cacheproxy; hit"), language
    assert upstream.total == calls + 3
