"""Tests for the simulated Yahoo-shaped upstream in proxy.sim."""

from __future__ import annotations

import asyncio
import gzip
import json
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from proxy.sim import SIM_STATS, SimConfig, SimStats, make_sim_app

NOW = 1_750_000_000.0  # a Sunday; fixed so sizes and bytes do not depend on the wall clock
PLAIN = {"Accept-Encoding": "identity"}
GZIP = {"Accept-Encoding": "gzip"}
CHART = "/v8/finance/chart"

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture
def make_client(aiohttp_client: AiohttpClient) -> MakeClient:
    """Clients that see raw wire bytes, against a sim with no latency and a frozen clock."""

    async def make(
        config: SimConfig | None = None, clock: Callable[[], float] = lambda: NOW
    ) -> Client:
        app = make_sim_app(config or SimConfig(latency_scale=0), random.Random(7), clock=clock)
        return await aiohttp_client(app, auto_decompress=False)

    return make


async def get_plain(client: Client, path: str) -> tuple[int, bytes]:
    resp = await client.get(path, headers=PLAIN)
    return resp.status, await resp.read()


async def get_json(client: Client, path: str) -> Any:
    status, body = await get_plain(client, path)
    assert status == 200, body
    return json.loads(body)


async def test_chart_shape_and_headers(make_client: MakeClient) -> None:
    client = await make_client()
    resp = await client.get(f"{CHART}/AAPL?range=5d&interval=15m", headers=PLAIN)
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "public, max-age=10, stale-while-revalidate=20"
    assert resp.content_type == "application/json"
    assert "Accept-Encoding" in resp.headers["Vary"]
    assert "ETag" not in resp.headers and "Last-Modified" not in resp.headers
    doc = json.loads(await resp.read())
    assert doc["chart"]["error"] is None
    (result,) = doc["chart"]["result"]
    assert result["meta"]["symbol"] == "AAPL"
    assert result["meta"]["range"] == "5d" and result["meta"]["dataGranularity"] == "15m"
    assert result["meta"]["generated_at"] == int(NOW) // 60 * 60
    (quote,) = result["indicators"]["quote"]
    n = len(result["timestamp"])
    assert n == 5 * 26  # five sessions of 26 quarter-hours
    assert result["timestamp"] == sorted(result["timestamp"])
    for field in ("open", "high", "low", "close", "volume"):
        assert len(quote[field]) == n
    assert all(lo <= hi for lo, hi in zip(quote["low"], quote["high"], strict=True))


@pytest.mark.parametrize(
    ("query", "low_kb", "high_kb"),
    [
        ("range=5d&interval=1m", 150, 260),
        ("range=1mo&interval=1d", 1, 6),
        ("", 1, 6),  # defaults are 1mo/1d
        ("range=1d&interval=5m", 6, 14),
        ("range=1y&interval=1d", 20, 40),
        ("range=5y&interval=1wk", 20, 40),
        ("range=max&interval=1mo", 40, 80),
    ],
)
async def test_chart_sizes(make_client: MakeClient, query: str, low_kb: int, high_kb: int) -> None:
    client = await make_client()
    status, body = await get_plain(client, f"{CHART}/MSFT?{query}")
    assert status == 200
    assert low_kb * 1000 <= len(body) <= high_kb * 1000


async def test_chart_defaults_to_1mo_daily(make_client: MakeClient) -> None:
    client = await make_client()
    meta = (await get_json(client, f"{CHART}/TSLA"))["chart"]["result"][0]["meta"]
    assert (meta["range"], meta["dataGranularity"]) == ("1mo", "1d")


async def test_chart_rejects_unsupported_range(make_client: MakeClient) -> None:
    client = await make_client()
    for query in ("range=7y", "interval=7m", "range=1y&interval=1m"):
        status, body = await get_plain(client, f"{CHART}/AAPL?{query}")
        assert status == 422
        assert json.loads(body)["chart"]["error"]["code"] == "Unprocessable Entity"


async def test_quote_summary(make_client: MakeClient) -> None:
    client = await make_client()
    resp = await client.get("/v10/finance/quoteSummary/005930.KS", headers=PLAIN)
    body = await resp.read()
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "public, max-age=1, stale-while-revalidate=9"
    assert 1500 <= len(body) <= 3000
    (result,) = json.loads(body)["quoteSummary"]["result"]
    assert set(result) == {"price", "summaryDetail"}
    assert result["price"]["symbol"] == "005930.KS" and result["price"]["currency"] == "KRW"
    more = await get_json(client, "/v10/finance/quoteSummary/AAPL?modules=price,financialData")
    assert set(more["quoteSummary"]["result"][0]) == {"price", "financialData"}
    status, bad = await get_plain(client, "/v10/finance/quoteSummary/AAPL?modules=nope")
    assert status == 400 and json.loads(bad)["quoteSummary"]["result"] is None


async def test_trending(make_client: MakeClient) -> None:
    client = await make_client()
    us = (await get_json(client, "/v1/finance/trending/US"))["finance"]["result"][0]
    assert us["count"] == 20 and len({q["symbol"] for q in us["quotes"]}) == 20
    kr = (await get_json(client, "/v1/finance/trending/KR?count=5"))["finance"]["result"][0]
    assert kr["quotes"][0]["symbol"] == "005930.KS" and len(kr["quotes"]) == 5
    status, body = await get_plain(client, "/v1/finance/trending/JP")
    assert status == 404 and json.loads(body)["finance"]["error"]["code"] == "Not Found"
    assert (await get_plain(client, "/v1/finance/trending/US?count=abc"))[0] == 400


async def test_search(make_client: MakeClient) -> None:
    client = await make_client()
    resp = await client.get("/v1/finance/search?q=sym012&quotesCount=4&newsCount=3")
    assert resp.headers["Cache-Control"] == "public, max-age=600, stale-while-revalidate=180"
    doc = json.loads(gzip.decompress(await resp.read()))
    assert [q["symbol"] for q in doc["quotes"]] == ["SYM0120", "SYM0121", "SYM0122", "SYM0123"]
    assert len(doc["news"]) == 3 and doc["news"][0]["relatedTickers"] == ["SYM0120"]
    assert (await get_plain(client, "/v1/finance/search"))[0] == 400


async def test_news_and_ncp(make_client: MakeClient) -> None:
    client = await make_client()
    status, body = await get_plain(client, "/v2/finance/news?symbol=NVDA")
    assert status == 200 and 3000 <= len(body) <= 8000
    stream = json.loads(body)["news"]["stream"]
    assert len(stream) == 10 and all(i["relatedTickers"] == ["NVDA"] for i in stream)
    assert (await get_plain(client, "/v2/finance/news?symbol=NOPE"))[0] == 404
    payload = {"serviceConfig": {"snippetCount": 4, "s": ["AAPL"]}}
    resp = await client.post("/xhr/ncp?queryRef=latestNews", json=payload, headers=PLAIN)
    assert resp.status == 200
    items = json.loads(await resp.read())["data"]["tickerStream"]["stream"]
    assert len(items) == 4
    assert all(i["content"]["finance"]["stockTickers"] == [{"symbol": "AAPL"}] for i in items)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"serviceConfig": {}}',
        b'{"serviceConfig": {"s": "AAPL"}}',
        b'{"serviceConfig": {"s": ["AAPL"], "snippetCount": "ten"}}',
    ],
)
async def test_ncp_malformed_body_is_400(make_client: MakeClient, body: bytes) -> None:
    client = await make_client()
    resp = await client.post("/xhr/ncp", data=body, headers=PLAIN)
    assert resp.status == 400
    assert resp.content_type == "application/json"
    assert json.loads(await resp.read())["error"]["code"] == "Bad Request"


async def test_briefings(make_client: MakeClient) -> None:
    client = await make_client()
    status, body = await get_plain(client, "/briefings")
    assert status == 200 and 4000 <= len(body) <= 9000
    listed = json.loads(body)["briefings"]
    assert len(listed) == 60
    status, article = await get_plain(client, f"/briefings/{listed[0]['id']}")
    assert status == 200 and 6000 <= len(article) <= 10000
    assert json.loads(article)["briefing"]["title"] == listed[0]["title"]
    newest = int(listed[0]["id"])
    for bad in (str(newest + 1), "0", "abc"):
        assert (await get_plain(client, f"/briefings/{bad}"))[0] == 404


async def test_same_request_same_bytes_until_the_minute_turns(make_client: MakeClient) -> None:
    now = [NOW]
    client = await make_client(clock=lambda: now[0])
    path = f"{CHART}/SYM0042?range=5d&interval=1m"
    first = await get_plain(client, path)
    assert first == await get_plain(client, path)
    zipped = [await (await client.get(path, headers=GZIP)).read() for _ in range(2)]
    assert zipped[0] == zipped[1]
    now[0] += 60
    assert (await get_plain(client, path))[1] != first[1]


async def test_gzip_on_request(make_client: MakeClient) -> None:
    client = await make_client()
    path = "/v10/finance/quoteSummary/META"
    plain_resp = await client.get(path, headers=PLAIN)
    plain = await plain_resp.read()
    assert "Content-Encoding" not in plain_resp.headers
    resp = await client.get(path, headers={"Accept-Encoding": "br, gzip;q=0.8"})
    assert resp.headers["Content-Encoding"] == "gzip"
    assert resp.headers["Vary"] == "Accept-Encoding"
    raw = await resp.read()
    assert len(raw) < len(plain) and gzip.decompress(raw) == plain
    refused = await client.get(path, headers={"Accept-Encoding": "gzip;q=0"})
    assert "Content-Encoding" not in refused.headers


async def test_unknown_symbol_is_404_with_yahoo_shape(make_client: MakeClient) -> None:
    client = await make_client()
    resp = await client.get(f"{CHART}/ZZZZ?range=5d", headers=PLAIN)
    assert resp.status == 404
    assert resp.headers["Cache-Control"] == "max-age=0, private"
    assert json.loads(await resp.read()) == {
        "chart": {
            "result": None,
            "error": {"code": "Not Found", "description": "No data found, symbol may be delisted"},
        }
    }
    status, body = await get_plain(client, "/v10/finance/quoteSummary/SYM9999")
    assert status == 404
    assert json.loads(body)["quoteSummary"]["error"]["code"] == "Not Found"


async def test_error_rate_one_gives_503(make_client: MakeClient) -> None:
    client = await make_client(SimConfig(latency_scale=0, error_rate=1.0))
    resp = await client.get(f"{CHART}/AAPL", headers=PLAIN)
    assert resp.status == 503 and resp.content_type == "application/json"
    assert resp.headers["Cache-Control"] == "max-age=0, private"
    assert json.loads(await resp.read())["finance"]["error"]["code"] == "Service Unavailable"


async def test_rate_429_one_gives_plain_text_429(make_client: MakeClient) -> None:
    client = await make_client(SimConfig(latency_scale=0, rate_429=1.0))
    resp = await client.get("/v1/finance/search?q=A", headers=PLAIN)
    assert resp.status == 429 and resp.content_type == "text/plain"
    assert resp.headers["Retry-After"] == "1"
    assert await resp.read() == b"Too Many Requests"


async def test_stats_count_by_route_and_key_and_reset(make_client: MakeClient) -> None:
    client = await make_client()
    for _ in range(3):
        await get_plain(client, f"{CHART}/AAPL?range=5d")
    await get_plain(client, f"{CHART}/ZZZZ")
    await get_plain(client, "/v10/finance/quoteSummary/AAPL")
    await client.post("/xhr/ncp", data=b"{}")
    stats = await get_json(client, "/__stats")
    assert stats["total"] == 6
    assert stats["by_route"] == {"chart": 4, "quote_summary": 1, "ncp": 1}
    assert next(iter(stats["by_key"].items())) == (f"{CHART}/AAPL?range=5d", 3)
    assert stats["by_key"][f"{CHART}/ZZZZ"] == 1
    in_process = client.app[SIM_STATS] if client.app else None
    assert in_process is not None and in_process.total == 6  # /__stats itself is not counted
    reset = await client.post("/__reset")
    assert reset.status == 200
    assert await get_json(client, "/__stats") == {"total": 0, "by_route": {}, "by_key": {}}


async def test_stats_count_requests_per_clock_second(make_client: MakeClient) -> None:
    now = [NOW + 0.25]
    client = await make_client(clock=lambda: now[0])
    for at in (0.25, 0.5, 0.99, 1.0, 3.7):
        now[0] = NOW + at
        await get_plain(client, f"{CHART}/AAPL?range=5d")
    stats = await get_json(client, "/__stats?seconds=1")
    second = int(NOW)
    assert stats["by_second"] == {str(second): 3, str(second + 1): 1, str(second + 3): 1}
    assert "by_second" not in await get_json(client, "/__stats")  # only when asked for
    await client.post("/__reset")
    assert (await get_json(client, "/__stats?seconds=1"))["by_second"] == {}


def test_stats_snapshot_keeps_the_busiest_1000_keys() -> None:
    stats = SimStats()
    for i in range(1005):
        for _ in range(1 + i % 7):
            stats.record("chart", f"/k{i}")
    by_key = stats.snapshot()["by_key"]
    assert len(by_key) == 1000
    counts = list(by_key.values())
    assert counts == sorted(counts, reverse=True) and counts[0] == 7
    stats.reset()
    assert (stats.total, stats.by_route, len(stats.by_key)) == (0, {}, 0)


async def test_latency_follows_the_median_and_slow_rate(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(delay: float, result: Any = None) -> Any:
        delays.append(delay)
        return await real_sleep(0, result)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    client = await make_client(SimConfig(latency_scale=1.0, rtt_ms=100.0))
    for _ in range(101):
        await get_plain(client, "/v10/finance/quoteSummary/AAPL")
    median = sorted(d for d in delays if d > 0)[50]
    assert 0.085 <= median <= 0.125  # 5 ms server + 100 ms RTT + ~0.4 ms transfer
    delays.clear()
    slow = await make_client(SimConfig(latency_scale=0.5, slow_rate=1.0))
    await get_plain(slow, "/briefings")
    assert [d for d in delays if d > 0] and all(1.0 <= d <= 2.6 for d in delays if d > 0)
    delays.clear()
    fast = await make_client(SimConfig(latency_scale=0, rtt_ms=100.0, slow_rate=1.0))
    await get_plain(fast, "/briefings")
    assert [d for d in delays if d > 0] == []


def test_config_rejects_out_of_range_rates() -> None:
    with pytest.raises(ValueError, match="error_rate"):
        SimConfig(error_rate=1.5)
    with pytest.raises(ValueError):
        SimConfig(latency_scale=-1)
