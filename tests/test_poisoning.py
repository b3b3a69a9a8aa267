"""Cache poisoning and leaks (issue 7, item 3): headers outside the key cannot change what is
stored for everyone; responses to requests with credentials are not served to others unless
the route says so; credentials the proxy adds never show anywhere but upstream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis
from aiohttp import web
from conftest import (
    Answer,
    CountingUpstream,
    Proxy,
    ProxyFactory,
    RedisServer,
    Reflecting,
    Reply,
    base_config,
    layered_cache,
    spawn_serve,
    wait_listening,
)

ENTRY = "GET api /quote/P"
# Headers that steer which host, URL, scheme or method an upstream serves (or a cache in
# front of it keys on), and headers the cached path simply does not key on.
STEERING = [
    ("X-Forwarded-Host", "evil.example"), ("X-Forwarded-Server", "evil.example"),
    ("X-Forwarded-Proto", "gopher"), ("X-Forwarded-Scheme", "nothttp"),
    ("X-Forwarded-Port", "1337"), ("X-Forwarded-Prefix", "/evil"),
    ("Forwarded", "host=evil.example;proto=http"), ("X-Host", "evil.example"),
    ("X-Original-Host", "evil.example"), ("X-Original-URL", "/admin"),
    ("X-Rewrite-URL", "/admin"), ("X-HTTP-Method-Override", "DELETE"),
    ("X-HTTP-Method", "DELETE"), ("X-Method-Override", "DELETE"),
]  # fmt: skip
UNKEYED = [
    ("Host", "evil.example"), ("Accept-Language", "xx"), ("Accept", "text/evil"),
    ("Accept-Encoding", "br"), ("User-Agent", "evil/1.0"), ("Origin", "http://evil.example"),
    ("Referer", "http://evil.example/"), ("Range", "bytes=0-1"), ("Cache-Control", "no-cache"),
    ("Pragma", "no-cache"), ("Content-Type", "text/evil"), ("X-Api-Key", "client-key"),
    ("Proxy-Authorization", "Basic ZXZpbDpldmls"), ("Max-Forwards", "0"),
    ("If-None-Match", '"evil"'), ("X-Evil", "1"),
]  # fmt: skip


def received(upstream: CountingUpstream, name: str) -> str | None:
    """The last upstream request's value for a header (case-insensitive)."""
    headers = {k.lower(): v for k, v in upstream.seen[-1].headers.items()}
    return headers.get(name.lower())


@pytest.mark.parametrize(
    ("name", "value"), STEERING + UNKEYED, ids=[n for n, _ in STEERING + UNKEYED]
)
async def test_an_unkeyed_header_changes_nothing_stored_for_everyone(
    proxy: Proxy, upstream: CountingUpstream, name: str, value: str
) -> None:
    """The first client's miss carries the header; the upstream never sees it, the entry is
    the plain one, and the next (clean) client gets it as a hit."""
    upstream.replies["/quote/P"] = Reply(body=b"plain")
    first = await proxy.client.get("/quote/P", headers={name: value})
    assert first.status == 200 and await first.read() == b"plain"
    assert received(upstream, name) != value
    assert proxy.l1_keys() == [ENTRY]
    clean = await proxy.client.get("/quote/P")
    assert clean.headers["Cache-Status"].startswith("cacheproxy; hit")
    assert await clean.read() == b"plain"
    assert upstream.total == 1


@pytest.mark.parametrize(("name", "value"), STEERING, ids=[n for n, _ in STEERING])
@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/xhr/ncp"), ("POST", "/quote/P")], ids=["pass", "method"]
)
async def test_steering_headers_are_not_forwarded_on_pass_through_either(
    proxy: Proxy, upstream: CountingUpstream, name: str, value: str, method: str, path: str
) -> None:
    """Uncached requests forward the client's headers, except those that would point the
    upstream (or a cache in front of it) at another host, URL or method."""
    response = await proxy.client.request(
        method, path, headers={name: value, "Accept-Language": "ko"}, data=b"{}"
    )
    assert response.status == 200
    assert received(upstream, name) != value
    assert received(upstream, "Accept-Language") == "ko"  # the rest does go through
    assert upstream.seen[-1].method == method


async def test_a_header_configured_into_the_key_is_forwarded_and_splits_entries(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    """ "Unless configured": a key header goes upstream, and each value has its own entry."""
    proxy = await make_proxy(
        routes=[
            {
                "name": "q",
                "path": "/quote/{symbol}",
                "upstream": "api",
                "ttl_class": "short",
                "key_headers": ["X-Forwarded-Proto"],
            }
        ]
    )
    for proto in ("https", "http", "https"):
        response = await proxy.client.get("/quote/P", headers={"X-Forwarded-Proto": proto})
        assert response.status == 200
    assert [s.headers.get("X-Forwarded-Proto") for s in upstream.seen] == ["https", "http"]
    assert sorted(proxy.l1_keys()) == [f"{ENTRY} x-forwarded-proto=http",
                                       f"{ENTRY} x-forwarded-proto=https"]  # fmt: skip


# --- credentials -------------------------------------------------------------------------

CREDENTIALS = [
    ("Authorization", "Bearer USER-1"), ("authorization", "Basic VVNFUi0xOnB3"),
    ("Cookie", "session=USER-1"), ("cookie", "a=1; session=USER-1"), ("Authorization", ""),
]  # fmt: skip


@pytest.mark.parametrize(("name", "value"), CREDENTIALS, ids=lambda v: v or "empty")
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_request_with_credentials_neither_reads_nor_fills_the_shared_cache(
    proxy: Proxy, upstream: CountingUpstream, name: str, value: str, method: str
) -> None:
    upstream.replies["/quote/P"] = Reply(body=b"for whoever asked")
    # Credentials first: the answer is theirs alone, and is not stored.
    mine = await proxy.client.request(method, "/quote/P", headers={name: value})
    assert mine.headers["Cache-Status"] == "cacheproxy; fwd=bypass; detail=credentials"
    assert received(upstream, name) == value
    assert proxy.l1_keys() == []
    # A clean client then fills the entry; credentials still bypass it.
    assert (await proxy.client.get("/quote/P")).headers["Cache-Status"].endswith("stored")
    again = await proxy.client.request(method, "/quote/P", headers={name: value})
    assert again.headers["Cache-Status"] == "cacheproxy; fwd=bypass; detail=credentials"
    assert upstream.total == 3


async def test_a_credentialed_request_never_joins_or_feeds_a_shared_fetch(
    proxy: Proxy, upstream: CountingUpstream
) -> None:
    """While a clean miss is in flight, a credentialed request for the same URL makes its
    own call (never waiting on, or handing its answer to, the shared one)."""
    upstream.gate = asyncio.Event()
    clean = asyncio.create_task(proxy.client.get("/quote/P"))
    await upstream.arrived.wait()
    mine = asyncio.create_task(proxy.client.get("/quote/P", headers={"Cookie": "s=USER-1"}))
    while upstream.total < 2:  # both are at the (gated) upstream
        upstream.arrived.clear()
        await asyncio.wait_for(upstream.arrived.wait(), 10)
    upstream.gate.set()
    clean_response, my_response = await asyncio.gather(clean, mine)
    assert clean_response.headers["Cache-Status"] == "cacheproxy; fwd=miss; stored"
    assert my_response.headers["Cache-Status"] == "cacheproxy; fwd=bypass; detail=credentials"
    cookies = [s.headers.get("Cookie") for s in upstream.seen]
    assert sorted(cookies, key=str) == [None, "s=USER-1"]


@pytest.mark.parametrize(
    "headers",
    [{"Cache-Control": "private, max-age=60"}, {"Set-Cookie": "session=USER-1"},
     {"Cache-Control": "no-store"}],
    ids=["private", "set-cookie", "no-store"],
)  # fmt: skip
async def test_a_shared_route_still_keeps_one_users_private_answer_to_itself(
    make_proxy: ProxyFactory, upstream: CountingUpstream, headers: dict[str, str]
) -> None:
    """`shared: true` lets credentialed answers be stored, but not ones the upstream marks
    as one user's."""
    proxy = await make_proxy(
        routes=[
            {
                "name": "acct",
                "path": "/acct",
                "upstream": "api",
                "ttl_class": "short",
                "shared": True,
            }
        ]
    )
    upstream.replies["/acct"] = Reply(body=b"USER-1's account", headers=headers)
    first = await proxy.client.get("/acct", headers={"Authorization": "Bearer USER-1"})
    assert await first.read() == b"USER-1's account"
    other = await proxy.client.get("/acct", headers={"Authorization": "Bearer USER-2"})
    assert "fwd=miss" in other.headers["Cache-Status"]  # its own fetch, not USER-1's entry
    assert received(upstream, "Authorization") == "Bearer USER-2"
    assert upstream.total == 2 and proxy.l1_keys() == []


async def test_a_shared_route_serves_a_public_answer_to_everyone_as_configured(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    """The other side of "unless the route says so": shared and public is a hit for all."""
    proxy = await make_proxy(
        routes=[
            {
                "name": "acct",
                "path": "/acct",
                "upstream": "api",
                "ttl_class": "short",
                "shared": True,
            }
        ]
    )
    for user in ("USER-1", "USER-2"):
        response = await proxy.client.get("/acct", headers={"Authorization": f"Bearer {user}"})
        assert response.status == 200
    assert upstream.total == 1


def joins(proxy: Proxy) -> asyncio.Event:
    """An event set when a request starts waiting on another one's fetch (coalesced)."""
    coalescer, joined = proxy.deps.coalescer, asyncio.Event()
    original_wait = coalescer.wait

    async def wait(future: Any, seconds: float) -> Any:
        joined.set()
        return await original_wait(future, seconds)

    coalescer.wait = wait  # type: ignore[method-assign]
    return joined


async def test_set_cookie_is_never_handed_to_waiting_clients(
    proxy: Proxy, upstream: CountingUpstream
) -> None:
    """Concurrent misses share one fetch, except when its answer sets a cookie: a waiter
    then makes its own call and gets only its own cookie."""
    upstream.replies["/quote/P"] = Reply(headers={"Set-Cookie": "session=FIRST"})
    upstream.gate = asyncio.Event()
    joined = joins(proxy)
    first = asyncio.create_task(proxy.client.get("/quote/P"))
    await upstream.arrived.wait()
    second = asyncio.create_task(proxy.client.get("/quote/P"))
    await asyncio.wait_for(joined.wait(), 10)  # the second waits on the first's fetch
    upstream.gate.set()
    responses = await asyncio.gather(first, second)
    # each answer is from the client's own call: the waiter fetched for itself
    assert [r.headers["Cache-Status"] for r in responses] == [
        "cacheproxy; fwd=miss; detail=set-cookie"
    ] * 2
    assert upstream.total == 2


# --- the proxy's own credentials ---------------------------------------------------------

SECRETS = ("HDR-SECRET-1", "AUTH-SECRET-2", "QUERY-SECRET-3", "SIG-SECRET-4")
CLIENT_SECRETS = ("CLIENT-KEY-5", "CLIENT-TOKEN-6")


def _everything(values: Any) -> str:
    return repr(values)


async def _redis_dump(url: str, prefix: str) -> list[Any]:
    client = redis.Redis.from_url(url)
    dump: list[Any] = []
    try:
        async for key in client.scan_iter(match=f"{prefix}*"):
            kind = (await client.type(key)).decode()
            value: Any = None
            if kind == "string":
                value = await client.get(key)
            elif kind == "hash":
                value = await client.hgetall(key)
            elif kind == "zset":
                value = await client.zrange(key, 0, -1, withscores=True)
            elif kind == "set":
                value = await client.smembers(key)
            elif kind == "list":
                value = await client.lrange(key, 0, -1)
            dump.append((key, kind, value))
    finally:
        await client.aclose()
    return dump


async def test_the_proxys_credentials_show_nowhere_but_upstream(
    make_proxy: ProxyFactory,
    upstream: CountingUpstream,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    cache = layered_cache(redis_server.url)
    prefix = cache["redis"]["key_prefix"]
    cache["max_object_size"] = "1KB"
    secret_upstream = {
        "headers": {"X-Api-Key": SECRETS[0], "Authorization": f"Bearer {SECRETS[1]}"},
        "query": {"apikey": SECRETS[2], "sig": SECRETS[3]},
    }
    proxy = await make_proxy(
        cache=cache,
        server={"access_log": True},
        upstreams={
            "api": {"url": upstream.url, "timeout": "5s", "retries": 0, **secret_upstream},
            "down": {"url": "http://127.0.0.1:9", "retries": 0, **secret_upstream},
        },
        ttl_classes={"short": {"ttl": 60, "stale_if_error": 600}},
        routes=[
            {"name": "quote", "path": "/quote/{symbol}", "upstream": "api", "ttl_class": "short",
             "methods": ["GET", "HEAD", "POST"]},
            {"name": "acct", "path": "/acct", "upstream": "api", "ttl_class": "short",
             "shared": True, "key_headers": ["Authorization"]},
            {"name": "news", "path": "/xhr/ncp", "methods": ["POST"], "upstream": "api",
             "pass": True},
            {"name": "down", "path": "/down/{x}", "upstream": "down", "ttl_class": "short"},
        ],
    )  # fmt: skip
    upstream.replies.update({
        "/quote/BIG": Reply(body=b"y" * 5000),
        "/quote/E500": Reply(status=500, body=b"upstream broke"),
        "/quote/E429": Reply(status=429, headers={"Retry-After": "1"}),
        "/quote/CUT": Reply(body=b"z" * 100, truncate=True),
        "/quote/E404": Reply(status=404),
    })  # fmt: skip
    seen: list[Any] = []

    async def call(method: str, url: str, **kwargs: Any) -> None:
        try:
            response = await proxy.client.request(method, url, **kwargs)
            seen.append((response.status, dict(response.headers), await response.read()))
        except aiohttp.ClientError as e:  # a broken connection is an answer here too
            seen.append(repr(e))

    client_query = f"apikey={CLIENT_SECRETS[0]}&range=5d"
    for method, url, kwargs in [
        ("GET", "/quote/MSFT", {}),
        ("GET", "/quote/AAPL", {}), ("GET", "/quote/AAPL", {}), ("HEAD", "/quote/AAPL", {}),
        ("GET", f"/quote/AAPL?{client_query}", {}), ("POST", "/quote/AAPL", {"data": b"x"}),
        ("POST", "/xhr/ncp", {"data": b"{}"}), ("GET", "/quote/BIG", {}),
        ("GET", "/quote/E500", {}), ("GET", "/quote/E429", {}), ("GET", "/quote/CUT", {}),
        ("GET", "/quote/E404", {}), ("GET", "/down/x", {}), ("GET", "/nowhere", {}),
        ("DELETE", "/quote/AAPL", {}), ("GET", "/quote/..%2fx", {}),
        ("GET", "/acct", {"headers": {"Authorization": f"Bearer {CLIENT_SECRETS[1]}"}}),
        ("GET", "/acct", {"headers": {"Authorization": f"Bearer {CLIENT_SECRETS[1]}"}}),
    ]:  # fmt: skip
        await call(method, url, **kwargs)
        if url == "/quote/E429":
            proxy.clock.advance(2)  # past its Retry-After, so the next calls go upstream
    # stale-if-error with the secrets on the failing call, then a refresh that fails
    proxy.clock.advance(120)
    upstream.replies["/quote/MSFT"] = Reply(status=503)
    await call("GET", "/quote/MSFT")
    assert seen[-1][0] == 200  # stale, served
    await proxy.deps.store.flush()
    stored = await _redis_dump(redis_server.url, prefix)
    assert stored, "the layered store wrote nothing to Redis"
    keys = [key async for key, _ in proxy.deps.store.scan()]
    assert any("apikey=#" in key for key in keys), keys  # the client's own, hashed
    admin = []
    for path in ("/stats", "/metrics", "/keys", "/keys?pattern=*apikey*", "/ttl", "/health",
                 "/hottest", "/openapi.json", "/"):  # fmt: skip
        response = await proxy.admin.get(path)
        admin.append((path, response.status, await response.read()))
    for body in ({"url": "/quote/AAPL"}, {"pattern": "/quote/*"}):
        response = await proxy.admin.post("/purge", json=body)
        admin.append((body, response.status, await response.read()))
    stored += await _redis_dump(redis_server.url, prefix)  # what the purges left
    # aiohttp.access: the test's own servers (the upstream logs the URLs it is sent, secrets
    # and all); `cacheproxy serve` turns aiohttp's access log off on both of its listeners.
    logs = [
        logging.Formatter().format(record) + repr(record.args)
        for record in caplog.records
        if record.name != "aiohttp.access"
    ]
    assert any(r.name == "cacheproxy.access" for r in caplog.records)
    everywhere = {"responses": seen, "admin": admin, "redis": stored, "logs": logs, "keys": keys}
    for secret in SECRETS + CLIENT_SECRETS:
        for where, what in everywhere.items():
            leaks = [
                x for x in (what if isinstance(what, list) else [what]) if secret in _everything(x)
            ]
            assert not leaks, f"{secret} leaked into {where}: {leaks[:3]}"
    statuses = [r if isinstance(r, str) else r[0] for r in seen]
    # every kind of answer was looked at: hits, misses, pass-through, errors of each kind
    assert {200, 400, 404, 405, 429, 500, 502}.issubset(statuses), statuses
    assert statuses.count(502) == 2, statuses  # the refused connection, the cut-off body
    # ... and the upstream did get them, so the test is looking at the right thing
    sent = upstream.seen[0]
    assert sent.headers["X-Api-Key"] == SECRETS[0]
    assert sent.headers["Authorization"] == f"Bearer {SECRETS[1]}"
    assert f"apikey={SECRETS[2]}" in sent.path_qs and f"sig={SECRETS[3]}" in sent.path_qs


# --- issue 11: what goes upstream outside the key (#2 shared routes, #9 X-Forwarded-For) ---

Start = Callable[[Answer], Awaitable[Reflecting]]
SHARED = [{"name": "acct", "path": "/acct", "upstream": "api", "ttl_class": "short",
           "shared": True}]  # fmt: skip


def per_cookie(request: web.Request, _body: bytes) -> tuple[bytes, dict[str, str]]:
    """A personalised page that says so: whose it is depends on the Cookie (Vary)."""
    whose = request.headers.get("Cookie", "nobody")
    return f"page for {whose}".encode(), {"Vary": "Cookie", "Cache-Control": "max-age=60"}


async def _shared_proxy(make_proxy: ProxyFactory, up: Reflecting, **overrides: Any) -> Proxy:
    return await make_proxy(
        upstreams={"api": {"url": up.url, "timeout": "5s"}}, routes=SHARED, **overrides
    )


async def _page(proxy: Proxy, cookie: str | None) -> tuple[bytes, str]:
    response = await proxy.client.get("/acct", headers={"Cookie": cookie} if cookie else {})
    assert response.status == 200
    return await response.read(), response.headers["Cache-Status"]


def _own(cookie: str | None) -> bytes:
    return f"page for {cookie or 'nobody'}".encode()


async def test_a_page_varying_on_an_unkeyed_cookie_is_never_served_to_another_cookie(
    make_proxy: ProxyFactory, reflecting: Start
) -> None:
    """Issue 11 #2: `shared: true` forwards Cookie without keying on it. Alice's page said
    `Vary: Cookie` and was served from cache to Bob. Now an answer that varies on a header
    that went upstream unkeyed is that client's alone; one fetched without the header is
    stored, and serves only requests without it."""
    up = await reflecting(per_cookie)
    proxy = await _shared_proxy(make_proxy, up)
    miss_vary = "cacheproxy; fwd=miss; detail=vary"
    assert await _page(proxy, "user=alice") == (_own("user=alice"), miss_vary)
    assert await _page(proxy, "user=bob") == (_own("user=bob"), miss_vary)
    assert proxy.l1_keys() == []
    assert await _page(proxy, None) == (_own(None), "cacheproxy; fwd=miss; stored")
    body, status = await _page(proxy, None)
    assert body == _own(None) and status.startswith("cacheproxy; hit")
    # The cookieless page is stored; it is not Alice's (nor Bob's) answer.
    assert await _page(proxy, "user=alice") == (_own("user=alice"), miss_vary)
    assert await _page(proxy, "user=bob") == (_own("user=bob"), miss_vary)
    assert up.total == 5 and proxy.l1_keys() == ["GET api /acct"]


@pytest.mark.parametrize(
    ("first", "second"),
    [("user=alice", "user=bob"), ("user=alice", None), (None, "user=bob")],
    ids=["alice-then-bob", "alice-then-nobody", "nobody-then-bob"],
)
async def test_a_waiter_never_gets_an_answer_that_varies_on_another_cookie(
    make_proxy: ProxyFactory, reflecting: Start, first: str | None, second: str | None
) -> None:
    """Issue 11 #2, coalesced: the second request joins the first one's fetch, and gets its
    own page from its own fetch when the shared answer varies on a cookie (either one's)."""
    up = await reflecting(per_cookie)
    proxy = await _shared_proxy(make_proxy, up)
    up.gate = asyncio.Event()
    joined = joins(proxy)
    leader = asyncio.create_task(_page(proxy, first))
    await asyncio.wait_for(up.arrived.wait(), 10)
    waiter = asyncio.create_task(_page(proxy, second))
    await asyncio.wait_for(joined.wait(), 10)  # the second waits on the first's fetch
    up.gate.set()
    (leader_body, _), (waiter_body, _) = await asyncio.gather(leader, waiter)
    assert (leader_body, waiter_body) == (_own(first), _own(second))
    assert up.total == 2


async def test_a_background_refresh_never_stores_the_page_of_the_cookie_it_carried(
    make_proxy: ProxyFactory, reflecting: Start
) -> None:
    """Issue 11 #2, refresh path: a stale hit refreshes with its client's credentials. When
    the answer now varies on the cookie, it is not stored (Bob never gets Alice's page)."""
    varies = False

    def answer(request: web.Request, body: bytes) -> tuple[bytes, dict[str, str]]:
        page, headers = per_cookie(request, body)
        return page, headers if varies else {"Cache-Control": "max-age=60"}

    up = await reflecting(answer)
    classes = {"short": {"ttl": 60, "stale_while_revalidate": 600}, "long": "1h"}
    proxy = await _shared_proxy(make_proxy, up, ttl_classes=classes)
    assert (await _page(proxy, None))[0] == _own(None)  # the public page, stored
    varies = True
    proxy.clock.advance(120)  # stale, within stale-while-revalidate
    body, status = await _page(proxy, "user=alice")
    assert body == _own(None) and "stale-while-revalidate" in status
    await asyncio.wait_for(proxy.deps.tasks.wait(), 10)  # the refresh, with Alice's cookie
    assert up.total == 2 and up.seen[-1].headers["Cookie"] == "user=alice"
    body, _ = await _page(proxy, "user=bob")
    assert body in (_own(None), _own("user=bob"))  # the public page, or Bob's own
    [(_key, entry)] = list(proxy.l1.items())
    assert entry.body == _own(None)


def echo_xff(request: web.Request, _body: bytes) -> tuple[bytes, dict[str, str]]:
    """An upstream that reflects X-Forwarded-For into its page."""
    seen = request.headers.get("X-Forwarded-For", "-")
    return f"<p>your address: {seen}</p>".encode(), {"Content-Type": "text/html"}


async def test_a_clients_x_forwarded_for_never_reaches_an_entry(
    make_proxy: ProxyFactory, reflecting: Start
) -> None:
    """Issue 11 #9: the client's X-Forwarded-For went upstream unkeyed, so an upstream that
    echoes it stored the attacker's markup for the next client. A cached route's fetch is
    made for everyone: it sends no X-Forwarded-For. Pass-through still appends to it."""
    up = await reflecting(echo_xff)
    proxy = await make_proxy(upstreams={"api": {"url": up.url, "timeout": "5s"}})
    markup = "<script>alert(1)</script>"
    attacker = await proxy.client.get("/quote/P", headers={"X-Forwarded-For": markup})
    assert markup not in (await attacker.read()).decode()
    victim = await proxy.client.get("/quote/P")
    assert victim.headers["Cache-Status"].startswith("cacheproxy; hit")
    assert await victim.read() == b"<p>your address: -</p>"
    assert "X-Forwarded-For" not in up.seen[0].headers
    passed = await proxy.client.post("/xhr/ncp", headers={"X-Forwarded-For": "10.0.0.1"})
    assert passed.status == 200
    assert up.seen[-1].headers["X-Forwarded-For"] == "10.0.0.1, 127.0.0.1"


def _by_path(request: web.Request, body: bytes) -> tuple[bytes, dict[str, str]]:
    if request.path == "/acct":
        return per_cookie(request, body)
    if request.path == "/search":  # how it read the body
        read = f"{request.headers.get('Content-Type')} | {request.headers.get('Content-Encoding')}"
        return read.encode(), {}
    return echo_xff(request, body)


async def test_a_real_process_serves_no_client_what_another_sent_unkeyed(
    reflecting: Start, tmp_path: Path
) -> None:
    """Issue 11 #2, #8, #9, #13 as found, against `cacheproxy serve`: Alice's and Bob's
    pages (one after the other, and at once), a POST body sent with another charset and
    coding, an echoed X-Forwarded-For, and overlong UTF-8 dots."""
    up = await reflecting(_by_path)
    routes = [*SHARED,
              {"name": "search", "path": "/search", "methods": ["POST"], "upstream": "api",
               "ttl_class": "short", "cache_post": True},
              {"name": "quote", "path": "/quote/{symbol}", "upstream": "api",
               "ttl_class": "short"}]  # fmt: skip
    served = await spawn_serve(base_config(up.url, routes=routes), tmp_path)
    try:
        await wait_listening(served.port)
        base = f"http://127.0.0.1:{served.port}"
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:

            async def get(path: str, **headers: str) -> tuple[int, bytes]:
                async with session.get(base + path, headers=headers) as r:
                    return r.status, await r.read()

            for cookie in ("user=alice", "user=bob", "user=alice"):
                assert await get("/acct", Cookie=cookie) == (200, _own(cookie))
            pair = await asyncio.gather(get("/acct", Cookie="user=carol"), get("/acct"),
                                        get("/acct", Cookie="user=dave"))  # fmt: skip
            assert [body for _, body in pair] == [_own("user=carol"), _own(None),
                                                  _own("user=dave")]  # fmt: skip
            markup = "<script>x</script>"
            await get("/quote/P", **{"X-Forwarded-For": markup})
            assert await get("/quote/P") == (200, b"<p>your address: -</p>")
            body = b'{"q": "AAPL"}'
            for coding in ("gzip", ""):
                headers = {"Content-Type": "application/json" + ("; charset=utf-16" * bool(coding))}
                if coding:
                    headers["Content-Encoding"] = coding
                async with session.post(base + "/search", data=body, headers=headers) as r:
                    read = await r.read()
            assert read == b"application/json | None"  # the victim's own reading
            calls = up.total
            for path in ("/quote/%C0%AE%C0%AE%C0%AFadmin", "/acct/%C0%AE%C0%AE%C0%AF"):
                assert (await get(path))[0] == 400
            assert up.total == calls
    finally:
        served.process.terminate()
        await asyncio.wait_for(served.process.wait(), 10)


async def test_an_l2_entry_varying_on_a_cookie_never_answers_that_cookie_elsewhere(
    make_proxy: ProxyFactory, reflecting: Start, redis_server: RedisServer
) -> None:
    """Issue 11 #2 across instances: the cookieless page one instance stored in L2 (with
    Vary: Cookie) does not answer Bob on another, whether found by lookup or after the
    lease; the entry stays the cookieless page for cookieless clients."""
    up = await reflecting(per_cookie)
    cache = layered_cache(redis_server.url)
    one = await _shared_proxy(make_proxy, up, cache=cache)
    two = await _shared_proxy(make_proxy, up, cache=cache)
    assert (await _page(one, None))[0] == _own(None)
    await one.deps.store.flush()
    assert await _page(two, "user=bob") == (_own("user=bob"), "cacheproxy; fwd=miss; detail=vary")
    body, status = await _page(two, None)
    assert body == _own(None) and status.startswith("cacheproxy; hit")
    assert up.total == 2
