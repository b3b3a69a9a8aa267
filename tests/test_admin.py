"""proxy/admin.py through a live proxy and a real counting upstream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    CountingUpstream,
    Proxy,
    ProxyFactory,
    ServeProcess,
    base_config,
    spawn_serve,
)
from prometheus_client.parser import text_string_to_metric_families

CHART = "/v8/finance/chart/{}"


async def get(proxy: Proxy, url: str) -> str:
    """GET through the proxy; the Cache-Status it answered with."""
    response = await proxy.client.get(url)
    assert response.status == 200, await response.text()
    await response.read()
    return response.headers["Cache-Status"]


async def admin_json(proxy: Proxy, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    response = await proxy.admin.request(method, path, **kwargs)
    return response.status, await response.json()


async def test_stats_counts_hits_misses_and_ratios(
    proxy: Proxy, upstream: CountingUpstream
) -> None:
    for url in (
        "/v8/finance/chart/AAPL",  # miss
        "/v8/finance/chart/AAPL",  # hit
        "/v8/finance/chart/AAPL",  # hit
        "/v8/finance/chart/MSFT",  # miss
        "/quote/AAPL",  # miss
        "/quote/AAPL",  # hit
    ):
        await get(proxy, url)
    await proxy.client.get("/nowhere")  # unmatched: an error, not a lookup
    status, stats = await admin_json(proxy, "GET", "/stats")
    assert status == 200
    assert upstream.total == 3
    assert stats["requests"] == 7
    assert stats["cacheable_requests"] == 6
    assert stats["outcomes"]["hit_l1"] == 3
    assert stats["outcomes"]["miss"] == 3
    assert stats["outcomes"]["error"] == 1
    assert stats["calls_saved"] == 3
    assert stats["hit_ratio"] == 0.5
    assert stats["upstream_calls_total"] == upstream.total
    assert stats["upstream_calls"] == {"api": upstream.total}
    chart = stats["routes"]["chart"]
    assert chart["requests"] == 4
    assert chart["outcomes"]["hit_l1"] == 2
    assert chart["outcomes"]["miss"] == 2
    assert chart["hit_ratio"] == 0.5
    assert chart["calls_saved"] == 2
    quote = stats["routes"]["quote"]
    assert quote["requests"] == 2
    assert quote["hit_ratio"] == 0.5
    assert quote["calls_saved"] == 1
    assert stats["layers"]["l1"]["entries"] == 3
    assert stats["layers"]["l1"]["hits"] == 3
    assert stats["layers"]["l1"]["sets"] == 3


async def test_stats_before_any_request(proxy: Proxy) -> None:
    status, stats = await admin_json(proxy, "GET", "/stats")
    assert status == 200
    assert stats["requests"] == 0
    assert stats["hit_ratio"] == 0.0
    assert stats["routes"] == {}
    assert stats["layers"]["l1"]["entries"] == 0


async def test_stats_counts_bypass_as_neither_hit_nor_lookup(
    proxy: Proxy, upstream: CountingUpstream
) -> None:
    await get(proxy, "/quote/AAPL")
    response = await proxy.client.post("/xhr/ncp", data=b"{}")
    assert response.status == 200
    _, stats = await admin_json(proxy, "GET", "/stats")
    assert stats["outcomes"]["bypass"] == 1
    assert stats["cacheable_requests"] == 1
    assert stats["upstream_calls_total"] == upstream.total == 2
    assert stats["routes"]["news"]["hit_ratio"] == 0.0


async def test_health(proxy: Proxy) -> None:
    await get(proxy, "/quote/AAPL")
    response = await proxy.admin.get("/health")
    assert response.status == 200
    assert response.content_type == "application/json"
    body = await response.json()
    assert body["status"] == "ok"
    assert body["l1"]["entries"] == 1
    assert set(body["upstreams"]) == {"api"}


async def test_keys_lists_entries_with_route_size_and_ttl_left(proxy: Proxy) -> None:
    await get(proxy, "/v8/finance/chart/AAPL?range=5d")
    await get(proxy, "/quote/MSFT")
    proxy.clock.advance(10)
    status, body = await admin_json(proxy, "GET", "/keys")
    assert status == 200
    assert body["count"] == 2
    by_url = {item["url"]: item for item in body["keys"]}
    assert set(by_url) == {"/v8/finance/chart/AAPL?range=5d", "/quote/MSFT"}
    chart = by_url["/v8/finance/chart/AAPL?range=5d"]
    assert chart["route"] == "chart"
    assert chart["ttl_left"] == 50
    assert chart["status"] == 200
    assert chart["tags"] == ["symbol=AAPL"]
    stored = await proxy.deps.store.lookup(chart["key"])
    assert stored is not None
    assert chart["size"] == stored.entry.size
    assert by_url["/quote/MSFT"]["route"] == "quote"
    assert by_url["/quote/MSFT"]["ttl_left"] == 3590


async def test_keys_lists_a_key_the_proxy_did_not_write_without_a_url(proxy: Proxy) -> None:
    await get(proxy, "/quote/AAPL")
    found = await proxy.deps.store.lookup("GET api /quote/AAPL")
    assert found is not None
    await proxy.deps.store.set("garbage", found.entry)  # Redis is shared: anything may be there
    status, body = await admin_json(proxy, "GET", "/keys")
    assert status == 200
    urls = {item["key"]: item["url"] for item in body["keys"]}
    assert urls == {"GET api /quote/AAPL": "/quote/AAPL", "garbage": ""}
    # ... and a key purge removes it by the text listed (nothing else could).
    status, body = await admin_json(proxy, "POST", "/purge", json={"key": "garbage"})
    assert (status, body["purged"]) == (200, 1)
    assert await proxy.deps.store.lookup("garbage") is None


async def test_keys_skips_expired_entries(proxy: Proxy) -> None:
    await get(proxy, "/v8/finance/chart/AAPL")  # 60 s
    await get(proxy, "/quote/AAPL")  # 1 h
    proxy.clock.advance(61)
    _, body = await admin_json(proxy, "GET", "/keys")
    assert [item["url"] for item in body["keys"]] == ["/quote/AAPL"]


async def test_keys_pattern_and_limit(proxy: Proxy) -> None:
    for symbol in ("AAPL", "MSFT", "GOOG"):
        await get(proxy, CHART.format(symbol))
    await get(proxy, "/quote/AAPL")
    _, body = await admin_json(proxy, "GET", "/keys", params={"pattern": "/v8/finance/chart/*"})
    assert body["count"] == 3
    assert all(item["route"] == "chart" for item in body["keys"])
    _, body = await admin_json(proxy, "GET", "/keys", params={"pattern": "/quote/*"})
    assert [item["url"] for item in body["keys"]] == ["/quote/AAPL"]
    _, body = await admin_json(proxy, "GET", "/keys", params={"pattern": "/v8/finance/chart/M*"})
    assert [item["url"] for item in body["keys"]] == ["/v8/finance/chart/MSFT"]
    _, body = await admin_json(proxy, "GET", "/keys", params={"limit": "2"})
    assert body["count"] == 2
    assert len(body["keys"]) == 2
    assert body["limit"] == 2


@pytest.mark.parametrize(
    "params",
    [{"limit": "abc"}, {"limit": "0"}, {"limit": "-1"}, {"limit": "100000"}, {"pattern": "abc"}],
)
async def test_keys_bad_query_is_400(proxy: Proxy, params: dict[str, str]) -> None:
    await get(proxy, "/quote/AAPL")
    status, body = await admin_json(proxy, "GET", "/keys", params=params)
    assert status == 400
    assert body["error"] == "bad_request"


async def test_ttl_shows_classes_and_routes(proxy: Proxy) -> None:
    status, body = await admin_json(proxy, "GET", "/ttl")
    assert status == 200
    assert body["ttl_classes"] == {
        "short": {"ttl": 60, "negative_ttl": 10},
        "long": {"ttl": 3600, "negative_ttl": 60},
    }
    routes = {r["name"]: r for r in body["routes"]}
    assert [r["name"] for r in body["routes"]] == ["chart", "quote", "news"]
    assert routes["chart"]["path"] == "/v8/finance/chart/{symbol}"
    assert routes["chart"]["ttl_class"] == "short"
    assert routes["chart"]["methods"] == ["GET", "HEAD"]
    assert routes["chart"]["pass"] is False
    assert routes["quote"]["methods"] == ["GET", "HEAD", "POST"]
    assert routes["news"]["ttl_class"] is None
    assert routes["news"]["pass"] is True
    assert routes["news"]["upstream"] == "api"


async def test_purge_url_then_next_get_is_a_miss(proxy: Proxy, upstream: CountingUpstream) -> None:
    url = "/v8/finance/chart/AAPL?range=5d"
    await get(proxy, url)
    await get(proxy, "/v8/finance/chart/MSFT?range=5d")
    assert (await get(proxy, url)).startswith("cacheproxy; hit")
    status, body = await admin_json(proxy, "POST", "/purge", json={"url": url})
    assert status == 200
    assert body["purged"] == 1
    assert (await get(proxy, url)) == "cacheproxy; fwd=miss; stored"
    assert upstream.calls["/v8/finance/chart/AAPL"] == 2
    assert (await get(proxy, "/v8/finance/chart/MSFT?range=5d")).startswith("cacheproxy; hit")


@pytest.mark.parametrize(
    "purge_url",
    [
        "/v8/finance/chart/AAPL?range=5d&_=1700000000123",
        "/v8/finance/chart/AAPL?_=1&range=5d",
        "/v8/finance/chart/%41APL?range=5d",
    ],
)
async def test_purge_url_normalises_like_the_cache_key(
    proxy: Proxy, upstream: CountingUpstream, purge_url: str
) -> None:
    await get(proxy, "/v8/finance/chart/AAPL?range=5d")
    status, body = await admin_json(proxy, "POST", "/purge", json={"url": purge_url})
    assert status == 200
    assert body["purged"] == 1
    assert len(proxy.l1) == 0
    assert (await get(proxy, "/v8/finance/chart/AAPL?range=5d")).startswith("cacheproxy; fwd=miss")
    assert upstream.total == 2


async def test_purge_url_that_is_not_cached(proxy: Proxy) -> None:
    await get(proxy, "/quote/AAPL")
    status, body = await admin_json(proxy, "POST", "/purge", json={"url": "/quote/MSFT"})
    assert status == 200
    assert body["purged"] == 0
    assert len(proxy.l1) == 1


async def test_purge_pattern_purges_only_matching(proxy: Proxy, upstream: CountingUpstream) -> None:
    await get(proxy, "/v8/finance/chart/AAPL?range=5d")
    await get(proxy, "/v8/finance/chart/MSFT")
    await get(proxy, "/quote/AAPL")
    status, body = await admin_json(
        proxy, "POST", "/purge", json={"pattern": "/v8/finance/chart/*"}
    )
    assert status == 200
    assert body["purged"] == 2
    assert (await get(proxy, "/quote/AAPL")).startswith("cacheproxy; hit")
    assert (await get(proxy, "/v8/finance/chart/MSFT")).startswith("cacheproxy; fwd=miss")
    assert upstream.total == 4


@pytest.mark.parametrize(
    ("kwargs"),
    [
        {"data": b"not json", "headers": {"Content-Type": "application/json"}},
        {"data": b"\xff\xfe", "headers": {"Content-Type": "application/json"}},
        {"data": b""},
        {"json": {"url": "/quote/AAPL", "pattern": "/quote/*"}},
        {"json": {}},
        {"json": {"keys": "/quote/AAPL"}},  # unknown field
        {"json": {"url": "/quote/AAPL", "soft": True}},  # soft is for tags and routes
        {"json": {"tag": "AAPL"}},  # not name=value
        {"json": {"route": "no-such-route"}},
        {"json": {"tag": "symbol=AAPL", "soft": "yes"}},
        {"json": {"key": ""}},
        {"json": {"key": "/quote/AAPL"}},  # a URL, not a key
        {"json": {"key": "GET api /quote/AAPL\r\nX: y"}},
        {"json": {"url": 5}},
        {"json": {"pattern": ["/quote/*"]}},
        {"json": {"url": None}},
        {"json": {"url": "quote/AAPL"}},
        {"json": {"pattern": "*"}},
        {"json": {"url": "http://evil.example/quote/AAPL"}},
        {"json": {"url": "/quote/../quote/AAPL"}},
        {"json": ["/quote/AAPL"]},
        {"json": "/quote/AAPL"},
        {"json": None},
    ],
    ids=lambda kw: repr(kw)[:40],
)
async def test_bad_purge_bodies_are_400_and_purge_nothing(
    proxy: Proxy, kwargs: dict[str, Any]
) -> None:
    await get(proxy, "/quote/AAPL")
    await get(proxy, "/v8/finance/chart/AAPL")
    status, body = await admin_json(proxy, "POST", "/purge", **kwargs)
    assert status == 400
    assert body["error"] == "bad_request"
    assert len(proxy.l1) == 2
    assert proxy.l1.stats.deletes == 0


async def test_clear(proxy: Proxy, upstream: CountingUpstream) -> None:
    await get(proxy, "/quote/AAPL")
    await get(proxy, "/v8/finance/chart/AAPL")
    status, body = await admin_json(proxy, "POST", "/clear")
    assert status == 200
    assert body["cleared"] == 2
    assert len(proxy.l1) == 0
    assert (await get(proxy, "/quote/AAPL")).startswith("cacheproxy; fwd=miss")
    assert upstream.total == 3


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_is_prometheus_text(proxy: Proxy) -> None:
    await get(proxy, "/v8/finance/chart/AAPL")
    await get(proxy, "/v8/finance/chart/AAPL")
    await get(proxy, "/quote/AAPL")
    await proxy.admin.post("/purge", json={"url": "/quote/AAPL"})
    response = await proxy.admin.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    assert "# TYPE cacheproxy_requests_total counter" in text
    assert 'cacheproxy_cache_entries{layer="l1"} 1.0' in text
    samples = _samples(text)
    requests = "cacheproxy_requests_total"
    assert samples[(requests, (("outcome", "miss"), ("route", "chart")))] == 1
    assert samples[(requests, (("outcome", "hit_l1"), ("route", "chart")))] == 1
    assert samples[(requests, (("outcome", "miss"), ("route", "quote")))] == 1
    assert samples[("cacheproxy_cache_entries", (("layer", "l1"),))] == 1  # after the purge
    assert samples[("cacheproxy_purges_total", (("kind", "url"),))] == 1
    # labels carry route names, never raw paths
    assert "/v8/finance" not in "".join(v for (_, labels), _ in samples.items() for _, v in labels)


async def test_admin_token_guards_mutating_calls(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(server={"admin_token": "t0k"})
    await get(proxy, "/quote/AAPL")
    purge = {"url": "/quote/AAPL"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "t0k"},
                    {"Authorization": "Bearer t0k0"}, {"Authorization": "Basic t0k"}):  # fmt: skip
        response = await proxy.admin.post("/purge", json=purge, headers=headers)
        assert response.status == 401, headers
        assert (await response.json())["error"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert len(proxy.l1) == 1
    response = await proxy.admin.post("/clear")
    assert response.status == 401
    assert len(proxy.l1) == 1
    response = await proxy.admin.post("/purge", json=purge, headers={"Authorization": "Bearer t0k"})
    assert response.status == 200
    assert (await response.json())["purged"] == 1
    assert len(proxy.l1) == 0


async def test_admin_token_guards_reads_of_keys_and_traffic(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(server={"admin_token": "t0k"})
    await get(proxy, "/quote/AAPL")
    token = {"Authorization": "Bearer t0k"}
    for path in ("/stats", "/keys", "/keys?pattern=/quote/*", "/hottest", "/ttl",
                 "/openapi.json"):  # fmt: skip
        for method in ("GET", "HEAD"):
            response = await proxy.admin.request(method, path)
            assert response.status == 401, (method, path)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert b"AAPL" not in await response.read()
            wrong = await proxy.admin.request(method, path, headers={"Authorization": "Bearer x"})
            assert wrong.status == 401, (method, path)
            assert (await proxy.admin.request(method, path, headers=token)).status == 200
    for path in ("/health", "/metrics", "/"):  # liveness, scrapes and the static page stay open
        assert (await proxy.admin.get(path)).status == 200, path


async def test_admin_protect_metrics_puts_metrics_behind_the_token(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(server={"admin_token": "t0k", "admin_protect_metrics": True})
    assert (await proxy.admin.get("/metrics")).status == 401
    ok = await proxy.admin.get("/metrics", headers={"Authorization": "Bearer t0k"})
    assert ok.status == 200
    assert "cacheproxy_requests_total" in await ok.text()
    assert (await proxy.admin.get("/health")).status == 200


async def test_without_a_token_mutating_calls_are_open(proxy: Proxy) -> None:
    await get(proxy, "/quote/AAPL")
    response = await proxy.admin.post("/purge", json={"url": "/quote/AAPL"})
    assert response.status == 200


async def test_cross_site_changes_are_refused(proxy: Proxy, upstream: CountingUpstream) -> None:
    await proxy.client.get("/quote/AAPL")
    evil = await proxy.admin.post(
        "/purge", json={"url": "/quote/AAPL"}, headers={"Origin": "http://evil.example"}
    )
    assert evil.status == 403
    assert len(proxy.l1) == 1
    origin = str(proxy.admin.make_url("")).rstrip("/")  # http://127.0.0.1:<admin port>
    same = await proxy.admin.post("/purge", json={"url": "/quote/AAPL"}, headers={"Origin": origin})
    assert same.status == 200
    assert len(proxy.l1) == 0


async def test_a_deeply_nested_purge_body_is_400(proxy: Proxy) -> None:
    response = await proxy.admin.post(
        "/purge", data=b"[" * 100_000, headers={"Content-Type": "application/json"}
    )
    assert response.status == 400


async def test_keys_never_show_credential_like_parameters(proxy: Proxy) -> None:
    """Issue 11 #12: `api_token`, `access_key` and `APIKEY` were listed in clear."""
    secrets = {"api_token": "TOK111", "access_key": "AK222", "APIKEY": "K333", "Sig": "S444"}
    query = "&".join(f"{name}={value}" for name, value in secrets.items())
    await get(proxy, CHART.format("AAPL") + f"?{query}&range=5d")
    response = await proxy.admin.get("/keys")
    listing = await response.text()
    assert response.status == 200 and "range=5d" in listing
    for name, value in secrets.items():
        assert f"{name}=#" in listing  # named, value hashed
        assert value not in listing


# --- the admin port's guard (proxy/adminauth.py) against a real `cacheproxy serve` --------


async def raw_request(
    port: int, method: str, path: str, headers: dict[str, str], version: str = "1.1"
) -> tuple[int, dict[str, Any]]:
    """One request written byte for byte (Host included, as a rebinding browser sends it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    head += "Content-Length: 0\r\nConnection: close\r\n"
    writer.write(f"{method} {path} HTTP/{version}\r\n{head}\r\n".encode())
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    body = rest.partition(b"\r\n\r\n")[2]
    return int(status_line.split()[1]), json.loads(body) if body.startswith(b"{") else {}


async def serving_admin(directory: Path, upstream_url: str, **server: Any) -> ServeProcess:
    data = base_config(upstream_url, server=server)
    started = await spawn_serve(data, directory)
    for _ in range(1000):
        if started.process.returncode is not None:
            break
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", started.admin_port)
        except OSError:
            await asyncio.sleep(0.01)  # waiting for the other process to listen
            continue
        writer.close()
        return started
    if started.process.returncode is None:
        started.process.kill()
    raise AssertionError("cacheproxy serve did not listen: " + started.log.read_text())


@pytest.fixture
async def served(upstream: CountingUpstream, tmp_path: Path) -> AsyncIterator[ServeProcess]:
    started = await serving_admin(tmp_path, upstream.url, admin_allowed_hosts=["admin.internal"])
    yield started
    started.process.kill()
    await started.process.wait()


async def test_dns_rebinding_is_refused_on_every_endpoint(served: ServeProcess) -> None:
    port = served.admin_port
    rebound = f"rebind.attacker.example:{port}"
    browser = {"Host": rebound, "Origin": f"http://{rebound}"}
    for method, path in (("POST", "/clear"), ("POST", "/reload"), ("DELETE", "/keys/x"),
                         ("GET", "/keys"), ("GET", "/stats"), ("GET", "/health"),
                         ("GET", "/metrics"), ("GET", "/")):  # fmt: skip
        for headers in (
            browser,
            {"Host": rebound},
            {"Host": "rebind.attacker.example"},
            {"Host": "a b"},
            {"Host": "[::1"},
            {"Host": "127.0.0.1@evil.example"},
        ):
            status, body = await raw_request(port, method, path, headers)
            assert status == 421, (method, path, headers)
            assert body["error"] == "misdirected"
            assert "server.admin_allowed_hosts" in body["detail"]


async def test_another_origin_cannot_change_anything(served: ServeProcess) -> None:
    port = served.admin_port
    for origin in ("http://127.0.0.1:8000", f"https://127.0.0.1:{port}", "http://127.0.0.1",
                   "null", f"http://localhost:{port}", f"http://evil.example:{port}"):  # fmt: skip
        for method, path in (("POST", "/clear"), ("POST", "/reload"), ("DELETE", "/keys/x")):
            headers = {"Host": f"127.0.0.1:{port}", "Origin": origin}
            status, body = await raw_request(port, method, path, headers)
            assert status == 403, (method, path, origin)
            assert body["error"] == "forbidden"


async def test_the_admin_listener_answers_to_its_own_names(served: ServeProcess) -> None:
    port = served.admin_port
    for host in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", "LOCALHOST",
                 f"admin.internal:{port}", "admin.internal", "[::1]", f"[::1]:{port}",
                 f"10.1.2.3:{port}"):  # fmt: skip
        assert (await raw_request(port, "GET", "/stats", {"Host": host}))[0] == 200, host
        same_site = {"Host": host, "Origin": f"http://{host}"}
        assert (await raw_request(port, "POST", "/clear", same_site))[0] == 200, host
    no_host = await raw_request(port, "POST", "/clear", {}, version="1.0")
    assert no_host[0] == 200  # HTTP/1.0 without Host: not a browser


async def test_behind_a_tls_proxy_the_origin_is_compared_with_its_scheme(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(server={"admin_allowed_hosts": ["admin.example"]})
    page = {"Host": "admin.example", "Origin": "https://admin.example"}
    assert (await proxy.admin.post("/clear", headers=page)).status == 403  # plain http here
    forwarded = {**page, "X-Forwarded-Proto": "https"}
    assert (await proxy.admin.post("/clear", headers=forwarded)).status == 200
    assert (await proxy.admin.get("/stats", headers={"Host": "admin.example:8443"})).status == 200
    assert (await proxy.admin.get("/stats", headers={"Host": "other.example"})).status == 421
