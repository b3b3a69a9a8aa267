"""The simulated Yahoo-Finance-shaped upstream: routes, stats, latency and fault injection."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.sim import articles, data, wire

CC_CHART = "public, max-age=10, stale-while-revalidate=20"
CC_QUOTE = "public, max-age=1, stale-while-revalidate=9"
CC_SEARCH = "public, max-age=600, stale-while-revalidate=180"
CC_NEWS = "public, max-age=300, stale-while-revalidate=75"
CC_TRENDING = "public, max-age=60, stale-while-revalidate=30"
CC_BRIEFINGS = "public, max-age=30"
CC_BRIEFING = "public, max-age=300"
CC_ERROR = "max-age=0, private"

_SERVER_MS = {"chart": 30.0, "quote_summary": 5.0, "search": 60.0}
_OTHER_SERVER_MS = 20.0
_HEAVY_CHART_MS = 80.0
_LINK_BITS_PER_MS = 50e6 / 1000
_STATS_KEYS = 1000
_STATS_SECONDS = 3600
_MAX_COUNT = 100
_DEFAULT_MODULES = ("price", "summaryDetail")
_CACHE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Knobs for the simulated upstream; the defaults give a fast, error-free server."""

    latency_scale: float = 1.0  # 0 = never sleep, for tests
    rtt_ms: float = 0.0
    error_rate: float = 0.0
    rate_429: float = 0.0
    slow_rate: float = 0.0
    symbols: int = 3000
    seed: int = 1

    def __post_init__(self) -> None:
        for name in ("error_rate", "rate_429", "slow_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        if self.latency_scale < 0 or self.rtt_ms < 0 or self.symbols < 0:
            raise ValueError("latency_scale, rtt_ms and symbols must not be negative")


class SimStats:
    """Request counters per route name, per path+query and per clock second."""

    __slots__ = ("by_key", "by_route", "by_second", "total")

    def __init__(self) -> None:
        self.total = 0
        self.by_route: dict[str, int] = {}
        self.by_key: Counter[str] = Counter()
        self.by_second: Counter[int] = Counter()  # int(clock()) -> requests that arrived then

    def record(self, route: str, key: str, now: float | None = None) -> None:
        """Count one request (in its second too when `now` is given)."""
        self.total += 1
        self.by_route[route] = self.by_route.get(route, 0) + 1
        self.by_key[key] += 1
        if now is not None:
            self.by_second[int(now)] += 1

    def reset(self) -> None:
        """Zero every counter."""
        self.total = 0
        self.by_route.clear()
        self.by_key.clear()
        self.by_second.clear()

    def snapshot(self, keys: int = _STATS_KEYS, seconds: bool = False) -> dict[str, Any]:
        """JSON-ready counters, keeping only the most-called keys, busiest first; with
        `seconds`, also requests per clock second (the last _STATS_SECONDS seconds seen)."""
        out: dict[str, Any] = {
            "total": self.total,
            "by_route": dict(self.by_route),
            "by_key": dict(self.by_key.most_common(keys)),
        }
        if seconds:
            recent = sorted(self.by_second)[-_STATS_SECONDS:]
            out["by_second"] = {str(s): self.by_second[s] for s in recent}
        return out


SIM_STATS = web.AppKey("sim_stats", SimStats)


class _Reject(Exception):
    """A handler's early answer: status and a ready error body."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def _int_param(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= _MAX_COUNT:
        body = articles.finance_error("Bad Request", f"Invalid value for {name}: {raw!r}")
        raise _Reject(400, body)
    return value


class _Sim:
    """Per-app state and handlers; one instance lives under _SIM in the app."""

    def __init__(self, config: SimConfig, rng: random.Random, clock: Callable[[], float]) -> None:
        self.config = config
        self.rng = rng
        self.clock = clock
        self.universe = data.Universe(config.symbols)
        self.stats = SimStats()
        # bodies are fixed per bucket; rebuilding a 5d/1m chart costs ~20 ms of event-loop time
        self.cache = wire.BodyCache(_CACHE_BYTES)

    def bucket(self) -> int:
        """Start of the current minute; bodies are fixed within it."""
        return int(self.clock()) // data.BUCKET_S * data.BUCKET_S

    def _ok(
        self, request: web.Request, key: tuple[Hashable, ...], build: Callable[[], bytes], cc: str
    ) -> web.Response:
        body = self.cache.get((*key, self.bucket()), build)
        return wire.reply(request, body, cc, compress=self.cache.gzip)

    def _info(
        self, request: web.Request, error: Callable[[str, str], bytes], description: str
    ) -> data.SymbolInfo:
        info = self.universe.get(request.match_info["symbol"])
        if info is None:
            raise _Reject(404, error("Not Found", description))
        return info

    async def chart(self, request: web.Request) -> web.Response:
        """GET /v8/finance/chart/{symbol}?range=&interval=&includePrePost=."""
        info = self._info(request, data.chart_error, "No data found, symbol may be delisted")
        q = request.query
        pre_post = q.get("includePrePost", "false").lower() == "true"
        range_, interval, bucket = q.get("range", "1mo"), q.get("interval", "1d"), self.bucket()
        try:
            return self._ok(
                request,
                ("chart", info.symbol, range_, interval, pre_post),
                lambda: data.chart_body(info, range_, interval, bucket, pre_post),
                CC_CHART,
            )
        except data.ChartParamError as exc:
            raise _Reject(422, data.chart_error("Unprocessable Entity", str(exc))) from exc

    async def quote_summary(self, request: web.Request) -> web.Response:
        """GET /v10/finance/quoteSummary/{symbol}?modules=price,summaryDetail."""
        info = self._info(
            request,
            data.quote_summary_error,
            f"Quote not found for symbol: {request.match_info['symbol']}",
        )
        wanted = [m.strip() for m in request.query.get("modules", "").split(",") if m.strip()]
        modules = tuple(dict.fromkeys(wanted)) or _DEFAULT_MODULES
        for m in modules:
            if m not in data.QUOTE_MODULES:
                raise _Reject(400, data.quote_summary_error("Bad Request", f"Invalid module {m}"))
        bucket = self.bucket()
        return self._ok(
            request,
            ("quote", info.symbol, modules),
            lambda: data.quote_summary_body(info, modules, bucket),
            CC_QUOTE,
        )

    async def trending(self, request: web.Request) -> web.Response:
        """GET /v1/finance/trending/{region}?count=."""
        region = request.match_info["region"].upper()
        if region not in articles.TRENDING_REGIONS:
            raise _Reject(404, articles.finance_error("Not Found", f"Unknown region {region}"))
        count, bucket = _int_param(request, "count", 20), self.bucket()
        return self._ok(
            request,
            ("trending", region, count),
            lambda: articles.trending_body(self.universe, region, count, bucket),
            CC_TRENDING,
        )

    async def search(self, request: web.Request) -> web.Response:
        """GET /v1/finance/search?q=&quotesCount=&newsCount=."""
        q = request.query.get("q", "").strip()
        if not q:
            raise _Reject(400, articles.finance_error("Bad Request", "Missing value for q"))
        quotes, news = _int_param(request, "quotesCount", 8), _int_param(request, "newsCount", 8)
        bucket = self.bucket()
        return self._ok(
            request,
            ("search", q.upper(), quotes, news),
            lambda: articles.search_body(self.universe, q, quotes, news, bucket),
            CC_SEARCH,
        )

    async def news(self, request: web.Request) -> web.Response:
        """GET /v2/finance/news?symbol=."""
        symbol = request.query.get("symbol", "")
        info = self.universe.get(symbol)
        if info is None:
            raise _Reject(404, articles.finance_error("Not Found", f"No news for {symbol!r}"))
        bucket = self.bucket()
        return self._ok(
            request, ("news", info.symbol), lambda: articles.news_body(info, bucket), CC_NEWS
        )

    async def ncp(self, request: web.Request) -> web.Response:
        """POST /xhr/ncp with {"serviceConfig":{"snippetCount":N,"s":[SYMBOL]}}."""
        try:
            payload = json.loads(await request.read())
            config = payload["serviceConfig"]
            symbols = config["s"]
            count = config.get("snippetCount", 10)
            if not (
                isinstance(symbols, list) and symbols and all(isinstance(s, str) for s in symbols)
            ):
                raise TypeError("s must be a non-empty list of symbols")
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise TypeError("snippetCount must be a non-negative integer")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            body = data.dumps({"error": {"code": "Bad Request", "description": str(exc)}})
            raise _Reject(400, body) from exc
        # unknown symbols simply have no stories, as on the real page
        infos = [i for s in symbols if (i := self.universe.get(s)) is not None]
        count, bucket = min(count, _MAX_COUNT), self.bucket()
        return self._ok(
            request,
            ("ncp", tuple(i.symbol for i in infos), count),
            lambda: articles.ncp_body(infos, count, bucket),
            CC_NEWS,
        )

    async def briefings(self, request: web.Request) -> web.Response:
        """GET /briefings: the live list."""
        bucket = self.bucket()
        return self._ok(
            request,
            ("briefings",),
            lambda: articles.briefings_body(self.universe, bucket),
            CC_BRIEFINGS,
        )

    async def briefing(self, request: web.Request) -> web.Response:
        """GET /briefings/{id}: one article."""
        bid, bucket = request.match_info["id"], self.bucket()
        if not articles.briefing_exists(bid, bucket):
            err = {"error": {"code": "Not Found", "description": f"No briefing {bid}"}}
            raise _Reject(404, data.dumps(err))
        return self._ok(
            request,
            ("briefing", bid),
            lambda: articles.briefing_body(self.universe, bid, bucket),
            CC_BRIEFING,
        )

    async def get_stats(self, request: web.Request) -> web.Response:
        """GET /__stats: the counters as JSON (?seconds=1: also requests per clock second)."""
        seconds = request.query.get("seconds", "") not in ("", "0")
        return web.json_response(self.stats.snapshot(seconds=seconds))

    async def post_reset(self, request: web.Request) -> web.Response:
        """POST /__reset: zero the counters."""
        self.stats.reset()
        return web.json_response({"ok": True})

    def delay_s(self, server_ms: float, size: int, slow: bool) -> float:
        """Lognormal response time around server + RTT + transfer time, scaled."""
        if self.config.latency_scale == 0:
            return 0.0
        median_ms = server_ms + self.config.rtt_ms + size * 8 / _LINK_BITS_PER_MS
        delay = self.rng.lognormvariate(math.log(median_ms), 0.5) / 1000
        if slow:
            delay += self.rng.uniform(2.0, 5.0)
        return delay * self.config.latency_scale


_SIM = web.AppKey("sim_state", _Sim)
_UNCOUNTED = frozenset({"__stats", "__reset"})


def _server_ms(route: str, request: web.Request) -> float:
    q = request.query
    if route == "chart" and q.get("range") == "5d" and q.get("interval") == "1m":
        return _HEAVY_CHART_MS
    return _SERVER_MS.get(route, _OTHER_SERVER_MS)


@web.middleware
async def _simulate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count the request, inject faults, then delay the answer like a remote server."""
    route = request.match_info.route.name
    if route in _UNCOUNTED:
        return await handler(request)
    sim = request.app[_SIM]
    sim.stats.record(route or "unmatched", request.path_qs, sim.clock())
    if route is None:
        return await handler(request)
    cfg = sim.config
    # one draw split into bands, so the two rates are fractions of all requests
    draw = sim.rng.random()
    slow = sim.rng.random() < cfg.slow_rate
    server_ms = _server_ms(route, request)
    resp: web.StreamResponse
    if draw < cfg.rate_429:
        # an edge rejection: almost no server time, and Yahoo's plain-text body
        resp = wire.reply(request, b"Too Many Requests", CC_ERROR, 429, "text/plain")
        resp.headers["Retry-After"] = "1"
        server_ms, slow = 1.0, False
    elif draw < cfg.rate_429 + cfg.error_rate:
        body = articles.finance_error("Service Unavailable", "Simulated upstream failure")
        resp = wire.reply(request, body, CC_ERROR, 503)
    else:
        try:
            resp = await handler(request)
        except _Reject as rej:
            resp = wire.reply(request, rej.body, CC_ERROR, rej.status)
    size = len(resp.body) if isinstance(resp, web.Response) and isinstance(resp.body, bytes) else 0
    delay = sim.delay_s(server_ms, size, slow)
    if delay > 0:
        await asyncio.sleep(delay)
    return resp


def make_sim_app(
    config: SimConfig = SimConfig(),
    rng: random.Random | None = None,
    *,
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """Build the simulator app; rng drives faults and latency, clock picks the body bucket."""
    sim = _Sim(config, rng if rng is not None else random.Random(config.seed), clock)
    app = web.Application(middlewares=[_simulate])
    app[_SIM] = sim
    app[SIM_STATS] = sim.stats
    r = app.router
    r.add_get("/v8/finance/chart/{symbol}", sim.chart, name="chart")
    r.add_get("/v10/finance/quoteSummary/{symbol}", sim.quote_summary, name="quote_summary")
    r.add_get("/v1/finance/trending/{region}", sim.trending, name="trending")
    r.add_get("/v1/finance/search", sim.search, name="search")
    r.add_get("/v2/finance/news", sim.news, name="news")
    r.add_post("/xhr/ncp", sim.ncp, name="ncp")
    r.add_get("/briefings", sim.briefings, name="briefings")
    r.add_get("/briefings/{id}", sim.briefing, name="briefing")
    r.add_get("/__stats", sim.get_stats, name="__stats")
    r.add_post("/__reset", sim.post_reset, name="__reset")
    return app
