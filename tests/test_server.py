"""End to end: a real client, the proxy, and a real upstream that counts its calls."""

from __future__ import annotations

import asyncio
import gzip
import socket
from collections.abc import Coroutine
from typing import Any

import aiohttp
import pytest
from conftest import CountingUpstream, Proxy, ProxyFactory, Reply, base_config

from proxy.config import parse_config
from proxy.deps import build_deps
from proxy.server import ProxyApp


async def test_second_identical_get_is_a_hit_without_upstream_call(
    proxy: Proxy, upstream: CountingUpstream
) -> None:
    first = await proxy.client.get("/v8/finance/chart/AAPL?range=5d")
    assert first.status == 200
    assert first.headers["Cache-Status"] == "cacheproxy; fwd=miss; stored"
    second = await proxy.client.get("/v8/finance/chart/AAPL?range=5d")
    assert second.status == 200
    assert second.headers["Cache-Status"].startswith("cacheproxy; hit;")
    assert "detail=l1" in second.headers["Cache-Status"]
    assert await second.read() == await first.read()
    assert upstream.total == 1


async def test_ignored_and_reordered_query_parameters_share_an_entry(
    proxy: Proxy, upstream: CountingUpstream
) -> None:
    await proxy.client.get("/v8/finance/chart/AAPL?range=5d&interval=1m")
    for url in (
        "/v8/finance/chart/AAPL?interval=1m&range=5d",
        "/v8/finance/chart/AAPL?range=5d&_=1700000000123&interval=1m",
        "/v8/finance/chart/%41APL?range=5d&interval=1m",
    ):
        response = await proxy.client.get(url)
        assert response.headers["Cache-Status"].startswith("cacheproxy; hit"), url
    assert upstream.total == 1
    await proxy.client.get("/v8/finance/chart/AAPL?range=1mo&interval=1m")
    assert upstream.total == 2


async def test_age_grows_with_the_clock(proxy: Proxy) -> None:
    await proxy.client.get("/quote/AAPL")
    proxy.clock.advance(42.5)
    response = await proxy.client.get("/quote/AAPL")
    assert response.headers["Age"] == "42"
    assert "ttl=3557" in response.headers["Cache-Status"]


async def test_upstream_age_is_added_to_residence_time(
    proxy: Proxy, upstream: CountingUpstream
) -> None:
    upstream.replies["/quote/MSFT"] = Reply(headers={"Age": "100"})
    miss = await proxy.client.get("/quote/MSFT")
    assert miss.headers["Age"] == "100"
    proxy.clock.advance(5)
    hit = await proxy.client.get("/quote/MSFT")
    assert hit.headers["Age"] == "105"


async def test_entry_expires_after_its_ttl(proxy: Proxy, upstream: CountingUpstream) -> None:
    await proxy.client.get("/v8/finance/chart/AAPL")
    proxy.clock.advance(59)
    assert (await proxy.client.get("/v8/finance/chart/AAPL")).headers["Age"] == "59"
    proxy.clock.advance(1)
    response = await proxy.client.get("/v8/finance/chart/AAPL")
    assert response.headers["Cache-Status"] == "cacheproxy; fwd=miss; stored"
    assert upstream.total == 2


async def test_responses_that_must_not_be_stored_are_not(
    proxy: Proxy, upstream: CountingUpstream
) -> None:
    upstream.replies.update({
        "/quote/COOKIE": Reply(headers={"Set-Cookie": "session=abc"}),
        "/quote/NOSTORE": Reply(headers={"Cache-Control": "no-store"}),
        "/quote/PRIVATE": Reply(headers={"Cache-Control": "private, max-age=60"}),
        "/quote/VARY": Reply(headers={"Vary": "*"}),
        "/quote/ERROR": Reply(status=503, body=b'{"error":"down"}'),
        "/quote/LIMIT": Reply(status=429, body=b"Too Many Requests"),
        "/quote/FORBIDDEN": Reply(status=403),
    })  # fmt: skip
    expected = {
        "COOKIE": "set-cookie", "NOSTORE": "no-store", "PRIVATE": "private",
        "VARY": "vary-star", "ERROR": "status-5xx", "LIMIT": "status-429",
        "FORBIDDEN": "status-403",
    }  # fmt: skip
    for symbol, reason in expected.items():
        for _ in range(2):
            response = await proxy.client.get(f"/quote/{symbol}")
            assert response.headers["Cache-Status"] == f"cacheproxy; fwd=miss; detail={reason}"
        assert upstream.calls[f"/quote/{symbol}"] == 2, symbol
    cookie = await proxy.client.get("/quote/COOKIE")
    assert cookie.headers["Set-Cookie"].startswith("session=abc")
    assert (await proxy.client.get("/quote/ERROR")).status == 503
    assert len(proxy.l1) == 0


async def test_404_is_stored_for_the_negative_ttl(proxy: Proxy, upstream: CountingUpstream) -> None:
    upstream.replies["/v8/finance/chart/NOPE"] = Reply(status=404, body=b'{"error":"Not Found"}')
    assert (await proxy.client.get("/v8/finance/chart/NOPE")).status == 404
    proxy.clock.advance(9)
    hit = await proxy.client.get("/v8/finance/chart/NOPE")
    assert hit.status == 404
    assert hit.headers["Cache-Status"].startswith("cacheproxy; hit")
    proxy.clock.advance(1)
    await proxy.client.get("/v8/finance/chart/NOPE")
    assert upstream.calls["/v8/finance/chart/NOPE"] == 2


async def test_concurrent_misses_make_one_upstream_call(
    proxy: Proxy, upstream: CountingUpstream
) -> None:
    upstream.gate = asyncio.Event()
    coalescer = proxy.deps.coalescer
    all_waiting = asyncio.Event()
    waiting = 0
    original_wait = coalescer.wait

    async def counting_wait(future: Any, seconds: float) -> Any:
        nonlocal waiting
        waiting += 1
        if waiting == 99:
            all_waiting.set()
        return await original_wait(future, seconds)

    coalescer.wait = counting_wait  # type: ignore[method-assign]
    requests = [
        asyncio.ensure_future(proxy.client.get("/v8/finance/chart/TSLA?range=5d"))
        for _ in range(100)
    ]
    # Hold the upstream until every other request waits on the leader's fetch.
    await asyncio.wait_for(all_waiting.wait(), 10)
    upstream.gate.set()
    responses = await asyncio.gather(*requests)
    assert upstream.total == 1
    assert all(r.status == 200 for r in responses)
    statuses = [r.headers["Cache-Status"] for r in responses]
    assert statuses.count("cacheproxy; fwd=miss; stored") == 1
    assert statuses.count("cacheproxy; fwd=miss; collapsed") == 99


async def test_head_is_served_from_the_get_entry(proxy: Proxy, upstream: CountingUpstream) -> None:
    get = await proxy.client.get("/quote/AAPL")
    head = await proxy.client.head("/quote/AAPL")
    assert head.status == 200
    assert head.headers["Cache-Status"].startswith("cacheproxy; hit")
    assert head.headers["Content-Length"] == str(len(await get.read()))
    assert await head.read() == b""
    assert upstream.total == 1


async def test_head_miss_fills_the_entry_with_a_get(
    proxy: Proxy, upstream: CountingUpstream
) -> None:
    head = await proxy.client.head("/quote/NVDA")
    assert head.status == 200
    assert upstream.seen[0].method == "GET"
    get = await proxy.client.get("/quote/NVDA")
    assert get.headers["Cache-Status"].startswith("cacheproxy; hit")
    assert await get.read() == b'{"ok": true}'


async def test_post_passes_through_with_its_body(proxy: Proxy, upstream: CountingUpstream) -> None:
    upstream.replies["/xhr/ncp"] = Reply(body=b"<echo>")
    payload = b'{"serviceConfig": {"snippetCount": 5, "s": ["AAPL"]}}' * 1000
    for _ in range(2):
        response = await proxy.client.post("/xhr/ncp?queryRef=latestNews", data=payload)
        assert response.status == 200
        assert await response.read() == payload
        assert response.headers["Cache-Status"] == "cacheproxy; fwd=bypass; detail=route-pass"
    assert upstream.calls["/xhr/ncp"] == 2
    assert upstream.seen[0].path_qs == "/xhr/ncp?queryRef=latestNews"


async def test_post_on_a_cached_route_is_forwarded_uncached(
    proxy: Proxy, upstream: CountingUpstream
) -> None:
    await proxy.client.get("/quote/AAPL")
    response = await proxy.client.post("/quote/AAPL", data=b"x=1")
    assert response.headers["Cache-Status"] == "cacheproxy; fwd=method; detail=method"
    assert upstream.seen[-1].method == "POST"
    assert upstream.seen[-1].body == b"x=1"


async def test_unmatched_path_is_404_without_upstream_call(
    proxy: Proxy, upstream: CountingUpstream
) -> None:
    response = await proxy.client.get("/admin/secrets")
    assert response.status == 404
    assert (await response.json())["error"] == "no_route"
    wrong_method = await proxy.client.delete("/v8/finance/chart/AAPL")
    assert wrong_method.status == 405
    assert upstream.total == 0


def _raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        return sock.recv(65536)


async def test_absolute_form_connect_and_traversal_are_refused(
    proxy: Proxy, upstream: CountingUpstream
) -> None:
    port = proxy.client.port
    assert port is not None
    for raw in (
        b"GET http://evil.example/v8/finance/chart/AAPL HTTP/1.1\r\nHost: evil.example\r\n\r\n",
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
        b"GET /v8/finance/chart/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v8/finance/chart/%2e%2e HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v8/finance/chart/%2E%2E%2Fx HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET //evil.example/x HTTP/1.1\r\nHost: x\r\n\r\n",
    ):
        answer = await asyncio.to_thread(_raw_request, port, raw)
        status = int(answer.split(b" ", 2)[1])
        assert 400 <= status < 500, (raw, answer[:80])
    assert upstream.total == 0


async def test_gzip_is_stored_once_and_decoded_for_clients_without_gzip(
    proxy: Proxy, upstream: CountingUpstream
) -> None:
    plain = b'{"quote": "' + b"x" * 5000 + b'"}'
    upstream.replies["/quote/GZ"] = Reply(
        body=gzip.compress(plain), headers={"Content-Encoding": "gzip"}
    )
    zipped = await proxy.client.get(
        "/quote/GZ", headers={"Accept-Encoding": "gzip"}, auto_decompress=False
    )
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(await zipped.read()) == plain
    identity = await proxy.client.get(
        "/quote/GZ", headers={"Accept-Encoding": "identity"}, auto_decompress=False
    )
    assert "Content-Encoding" not in identity.headers
    assert await identity.read() == plain
    assert upstream.total == 1
    assert upstream.seen[0].headers["Accept-Encoding"] == "gzip"


async def test_oversized_bodies_stream_through_uncached(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy(cache={"max_object_size": "1KB"})
    upstream.replies["/quote/BIG"] = Reply(body=b"y" * 50_000)
    for _ in range(2):
        response = await proxy.client.get("/quote/BIG")
        assert await response.read() == b"y" * 50_000
        assert response.headers["Cache-Status"] == "cacheproxy; fwd=miss; detail=too-large"
    assert upstream.total == 2


async def test_forwarding_headers_and_credentials(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy(
        upstreams={
            "api": {
                "url": upstream.url,
                "headers": {"User-Agent": "cacheproxy-test"},
                "query": {"apikey": "s3cret"},
            }
        }
    )
    response = await proxy.client.get(
        "/quote/AAPL?apikey=client-guess",
        headers={"X-Forwarded-Host": "evil.example", "Connection": "keep-alive, X-Drop",
                 "X-Drop": "1", "X-Forwarded-For": "10.0.0.1"},
    )  # fmt: skip
    assert response.status == 200
    seen = upstream.seen[0]
    assert seen.path_qs == "/quote/AAPL?apikey=s3cret"
    assert seen.headers["User-Agent"] == "cacheproxy-test"
    assert "X-Forwarded-For" not in seen.headers  # a cached route's fetch is everyone's
    assert "X-Forwarded-Host" not in seen.headers
    assert "X-Drop" not in seen.headers
    assert seen.headers["Host"] == upstream.url.split("//", 1)[1].rstrip("/")
    keys = [key async for key, _ in proxy.deps.store.scan()]
    assert len(keys) == 1
    assert "s3cret" not in keys[0] and "client-guess" not in keys[0]


async def test_requests_with_credentials_bypass_the_shared_cache(
    proxy: Proxy, upstream: CountingUpstream
) -> None:
    await proxy.client.get("/quote/AAPL")
    response = await proxy.client.get("/quote/AAPL", headers={"Authorization": "Bearer user1"})
    assert response.headers["Cache-Status"] == "cacheproxy; fwd=bypass; detail=credentials"
    assert upstream.seen[-1].headers["Authorization"] == "Bearer user1"
    assert upstream.total == 2


async def test_upstream_down_is_502_and_slow_is_504(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    proxy = await make_proxy(
        upstreams={
            "api": {"url": f"http://127.0.0.1:{dead_port}", "connect_timeout": "1s"},
            "slow": {"url": upstream.url, "timeout": "200ms"},
        },
        routes=[
            {"name": "dead", "path": "/quote/{symbol}", "upstream": "api", "ttl_class": "short"},
            {"name": "slow", "path": "/slow", "upstream": "slow", "ttl_class": "short"},
        ],
    )
    down = await proxy.client.get("/quote/AAPL")
    assert down.status == 502
    assert (await down.json())["error"] == "upstream_connect"
    upstream.gate = asyncio.Event()  # never set: the upstream hangs
    slow = await proxy.client.get("/slow")
    assert slow.status == 504
    assert (await slow.json())["error"] == "upstream_timeout"
    assert len(proxy.l1) == 0


async def test_truncated_upstream_body_is_502_and_never_stored(
    proxy: Proxy, upstream: CountingUpstream
) -> None:
    upstream.replies["/quote/CUT"] = Reply(body=b"z" * 5000, truncate=True)
    response = await proxy.client.get("/quote/CUT")
    assert response.status == 502
    assert (await response.json())["error"] == "upstream_protocol"
    assert len(proxy.l1) == 0


async def test_truncated_streamed_body_aborts_the_client_connection(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy(cache={"max_object_size": "1KB"})
    upstream.replies["/quote/CUT"] = Reply(body=b"z" * 50_000, truncate=True)
    response = await proxy.client.get("/quote/CUT")
    assert response.status == 200  # headers were relayed before the upstream broke
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(response.read(), 10)
    assert len(proxy.l1) == 0
    # The proxy keeps serving other requests.
    assert (await proxy.client.get("/quote/AAPL")).status == 200


async def test_head_on_a_relayed_response_sends_no_body(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy(cache={"max_object_size": "1KB"})
    upstream.replies["/quote/BIG"] = Reply(body=b"y" * 5000)
    # One connection: a body after the HEAD would be read as the next response.
    async with aiohttp.ClientSession(
        str(proxy.client.make_url("")), connector=aiohttp.TCPConnector(limit=1)
    ) as session:
        async with session.head("/quote/BIG") as head:
            assert head.status == 200
            assert head.headers["Cache-Status"] == "cacheproxy; fwd=miss; detail=too-large"
        async with session.get("/quote/AAPL") as get:
            assert get.status == 200
            assert await get.read() == b'{"ok": true}'


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([("Cache-Control", "public"), ("Cache-Control", "no-store")], "no-store"),
        ([("Cache-Control", "max-age=60"), ("Cache-Control", "private")], "private"),
        ([("Vary", "Accept"), ("Vary", "*")], "vary-star"),
        ([("Vary", "Accept, *")], "vary-star"),
        ([("Cache-Control", "no-cache")], "no-cache"),
    ],
)
async def test_directives_on_any_header_line_are_honoured(
    proxy: Proxy, upstream: CountingUpstream, headers: list[tuple[str, str]], reason: str
) -> None:
    upstream.replies["/quote/X"] = Reply(headers=headers)
    for _ in range(2):
        response = await proxy.client.get("/quote/X")
        assert response.headers["Cache-Status"] == f"cacheproxy; fwd=miss; detail={reason}"
    assert upstream.total == 2


async def test_corrupt_gzip_is_served_as_stored_not_as_a_500(
    proxy: Proxy, upstream: CountingUpstream
) -> None:
    broken = bytearray(gzip.compress(b'{"q": "' + b"x" * 3000 + b'"}'))
    broken[20] ^= 0xFF
    upstream.replies["/quote/BAD"] = Reply(body=bytes(broken), headers={"Content-Encoding": "gzip"})
    for _ in range(2):
        response = await proxy.client.get(
            "/quote/BAD", headers={"Accept-Encoding": "identity"}, auto_decompress=False
        )
        assert response.status == 200
        assert await response.read() == bytes(broken)


@pytest.mark.parametrize(
    ("path", "extra", "max_size"),
    [
        ("/quote/PRIV", {"Set-Cookie": "s=1"}, "8MB"),  # private: relayed from memory
        ("/quote/HUGE", {}, "1KB"),  # too large: relayed while streaming
    ],
)
async def test_gzip_asked_for_by_the_proxy_is_undone_for_clients_without_gzip(
    make_proxy: ProxyFactory,
    upstream: CountingUpstream,
    path: str,
    extra: dict[str, str],
    max_size: str,
) -> None:
    proxy = await make_proxy(cache={"max_object_size": max_size})
    plain = b'{"data": "' + b"z" * 20_000 + b'"}'
    upstream.replies[path] = Reply(
        body=gzip.compress(plain), headers={"Content-Encoding": "gzip", **extra}
    )
    for accept in ("identity", "gzip;q=0", ""):
        response = await proxy.client.get(
            path, headers={"Accept-Encoding": accept}, auto_decompress=False
        )
        assert "Content-Encoding" not in response.headers, accept
        assert await response.read() == plain


async def test_gzip_entries_say_they_vary_on_accept_encoding(
    proxy: Proxy, upstream: CountingUpstream
) -> None:
    upstream.replies["/quote/GZ"] = Reply(
        body=gzip.compress(b"{}"), headers={"Content-Encoding": "gzip"}
    )
    await proxy.client.get("/quote/GZ")
    hit = await proxy.client.get("/quote/GZ", headers={"Accept-Encoding": "gzip"})
    assert hit.headers["Vary"] == "Accept-Encoding"


async def test_credential_headers_in_keys_are_hashed(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy(
        routes=[
            {"name": "account", "path": "/acct/{id}", "upstream": "api", "ttl_class": "short",
             "shared": True, "key_headers": ["Authorization", "Accept-Language"]},
        ]
    )  # fmt: skip
    for token in ("USER-TOKEN-1", "USER-TOKEN-2", "USER-TOKEN-1"):
        response = await proxy.client.get(
            "/acct/1", headers={"Authorization": f"Bearer {token}", "Accept-Language": "ko"}
        )
        assert response.status == 200
    assert upstream.total == 2  # one entry per token, the third request a hit
    listing = await (await proxy.admin.get("/keys")).json()
    keys = [item["key"] for item in listing["keys"]]
    assert len(keys) == 2
    assert all("USER-TOKEN" not in key and "accept-language=ko" in key for key in keys)


# --- invalidation after an unsafe request costs a few Redis commands (issue 11 #5) -------


async def _redis_calls(client: Any) -> dict[str, int]:
    stats = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in stats.items()}


async def _invalidation_commands(
    upstream: CountingUpstream, redis_server: Any, tmp_path: Any, filler: int
) -> tuple[dict[str, int], int]:
    """Redis commands one PUT costs a real `cacheproxy serve` with `filler` other keys in L2;
    and the upstream calls a key-header variant and a cached POST then make."""
    import uuid

    from conftest import base_config, eventually, layered_cache, spawn_serve
    from redis.asyncio import Redis

    prefix = f"t{uuid.uuid4().hex[:8]}:"
    routes = [
        {"name": "q", "path": "/q/{s}", "methods": ["GET", "HEAD", "POST"], "upstream": "api",
         "ttl_class": "long", "key_headers": ["Accept-Language"], "cache_post": True},
        {"name": "q_put", "path": "/q/{s}", "methods": ["PUT"], "upstream": "api",
         "pass": True},
    ]  # fmt: skip
    cache = layered_cache(redis_server.url, prefix, popularity_flush="0s")
    data = base_config(upstream.url, routes=routes, cache=cache)
    client = Redis.from_url(redis_server.url)
    served = await spawn_serve(data, tmp_path)
    try:
        pipe = client.pipeline(transaction=False)
        for i in range(filler):
            pipe.set(f"{prefix}e:GET api /other/{i}", b"x")
        await pipe.execute()
        base = f"http://127.0.0.1:{served.port}"
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                try:
                    async with http.get(f"{base}/q/A", headers={"Accept-Language": "en"}):
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)  # waiting for the process to come up
            async with http.post(f"{base}/q/A", data=b'{"n": 1}'):
                pass
            await eventually(lambda: upstream.total == 2)
            for _ in range(200):  # both L2 writes landed
                if await client.exists(f"{prefix}e:GET api /q/A accept-language=en") and len(
                    [k async for k in client.scan_iter(match=f"{prefix}e:POST *")]
                ):
                    break
                await asyncio.sleep(0.05)  # waiting for the other process's writes
            before = await _redis_calls(client)
            async with http.put(f"{base}/q/A", data=b"new") as put:
                assert put.status == 200
            after = await _redis_calls(client)
            spent = {n: c - before.get(n, 0) for n, c in after.items() if c > before.get(n, 0)}
            calls = upstream.total
            async with http.get(f"{base}/q/A", headers={"Accept-Language": "en"}) as again:
                assert "fwd=miss" in again.headers["Cache-Status"]
            async with http.post(f"{base}/q/A", data=b'{"n": 1}') as again:
                assert "fwd=miss" in again.headers["Cache-Status"]
            return spent, upstream.total - calls
    finally:
        served.process.kill()
        await served.process.wait()
        await client.aclose()


@pytest.mark.parametrize("filler", [1000, 8000])
async def test_an_unsafe_request_costs_a_few_redis_commands_however_large_l2_is(
    upstream: CountingUpstream, redis_proc: Any, tmp_path: Any, filler: int
) -> None:
    spent, refetched = await _invalidation_commands(upstream, redis_proc, tmp_path, filler)
    # Was a SCAN of all of L2 per purge (two per POST): 1,200 SCANs over 300k keys.
    spent.pop("info", None)  # ours
    spent.pop("ping", None)  # the backplane's liveness pings
    assert "scan" not in spent
    assert sum(spent.values()) <= 6, spent  # UNLINK, HSET, two PUBLISH: whatever `filler`
    assert refetched == 2  # the key-header variant and the cached POST went upstream again


# --- ProxyApp.running(): start and cleanup as one context ----------------------------------


async def test_leaving_running_lands_l2_writes_then_closes_tasks_sessions_and_stores(
    upstream: CountingUpstream,
) -> None:
    deps = build_deps(parse_config(base_config(upstream.url), env={}))
    calls: list[str] = []
    _record(deps.store, "store", "flush", calls)
    _record(deps.tasks, "tasks", "close", calls)
    _record(deps.upstreams, "upstreams", "close", calls)
    _record(deps.store, "store", "close", calls)
    async with ProxyApp(deps).running() as app:
        assert app.deps is deps
        sessions = list(deps.upstreams._sessions.values())
        assert sessions and not any(s.closed for s in sessions)
        assert calls == []
    # (The store's close flushes again on its own, after: nothing is left by then.)
    assert calls[:4] == ["store.flush", "tasks.close", "upstreams.close", "store.close"]
    assert all(s.closed for s in sessions)


async def test_a_failure_part_way_through_the_start_closes_what_was_opened(
    upstream: CountingUpstream,
) -> None:
    config = parse_config(base_config(upstream.url, warm={"urls": ["/quote/AAPL"]}), env={})
    deps = build_deps(config)
    calls: list[str] = []
    _record(deps.upstreams, "upstreams", "close", calls)
    _record(deps.store, "store", "close", calls)
    opened: list[aiohttp.ClientSession] = []

    def refuse(coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        coro.close()
        opened.extend(deps.upstreams._sessions.values())
        raise RuntimeError(f"cannot start {name}")

    deps.tasks.spawn = refuse  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="cannot start warm-start"):
        async with ProxyApp(deps).running():
            pytest.fail("the block ran although the start failed")
    assert calls == ["upstreams.close", "store.close"]
    assert opened and all(session.closed for session in opened)


def _record(owner: object, label: str, method: str, calls: list[str]) -> None:
    original = getattr(owner, method)

    async def recorded() -> None:
        calls.append(f"{label}.{method}")
        await original()

    setattr(owner, method, recorded)
