"""`cacheproxy sim` and `cacheproxy demo`: the simulator, the proxy and Zipf page-view traffic."""

from __future__ import annotations

import argparse
import asyncio
import bisect
import os
import random
import statistics
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy.admin import make_admin_app
from proxy.config import load_config
from proxy.deps import build_deps
from proxy.server import ProxyApp
from proxy.sim import SimConfig, make_sim_app
from proxy.sim.app import SIM_STATS
from proxy.sites import start_site, wait_for_signal
from proxy.tasks import Tasks

# Range switches on the detail page: half to 1mo, half to 3mo/6mo/1y/5y weighted 40/30/20/10.
_RANGES = ("1mo", "3mo", "6mo", "1y", "5y")
_RANGE_WEIGHTS = (50, 20, 15, 10, 5)
_REAL = ("AAPL", "MSFT", "TSLA", "NVDA", "GOOG", "AMZN", "META", "005930.KS")


class Zipf:
    """Draws ranks 0..n-1 with probability proportional to 1 / (rank + 1) ** alpha."""

    def __init__(self, n: int, alpha: float, rng: random.Random) -> None:
        weights = [1.0 / (rank + 1) ** alpha for rank in range(n)]
        total = sum(weights)
        running = 0.0
        self._cumulative = []
        for w in weights:
            running += w / total
            self._cumulative.append(running)
        self._rng = rng

    def draw(self) -> int:
        """One rank."""
        index = bisect.bisect_left(self._cumulative, self._rng.random())
        return min(index, len(self._cumulative) - 1)


@dataclass
class Workload:
    """Page views of a market app as request URLs: home, stock detail (with a chart and
    news), briefings and search, over Zipf-popular symbols, some with a cache-buster or
    their parameters shuffled."""

    rng: random.Random
    alpha: float = 1.0
    symbols: int = 3000
    briefing_ids: list[str] = field(default_factory=list)
    buster_rate: float = 0.2  # requests carrying a `_=<ms>` cache-buster
    shuffle_rate: float = 0.3  # requests with parameters in another order

    def __post_init__(self) -> None:
        self._names = [*_REAL, *(f"SYM{i:04d}" for i in range(self.symbols - len(_REAL)))]
        self._symbol = Zipf(len(self._names), self.alpha, self.rng)
        self._briefing = Zipf(max(1, len(self.briefing_ids)), self.alpha, self.rng)

    def page_view(self) -> list[str]:
        """The requests one page view makes."""
        roll = self.rng.random()
        if roll < 0.35:
            region = "US" if self.rng.random() < 0.7 else "KR"
            return [self._url(f"/v1/finance/trending/{region}", [("count", "20")]), "/briefings"]
        if roll < 0.80:
            symbol = self._names[self._symbol.draw()]
            urls = [
                self._url(f"/v10/finance/quoteSummary/{symbol}", [("modules", "price")]),
                self._url(f"/v8/finance/chart/{symbol}", [("range", "5d"), ("interval", "15m")]),
                self._url("/v2/finance/news", [("symbol", symbol)]),
            ]
            if self.rng.random() < 0.35:
                chart_range = self.rng.choices(_RANGES, _RANGE_WEIGHTS)[0]
                params = [("range", chart_range), ("interval", "1d")]
                urls.append(self._url(f"/v8/finance/chart/{symbol}", params))
            return urls
        if roll < 0.92 and self.briefing_ids:
            return [f"/briefings/{self.briefing_ids[self._briefing.draw()]}"]
        name = self._names[self._symbol.draw()]
        return [
            self._url("/v1/finance/search", [("q", name[:n]), ("quotesCount", "6")])
            for n in range(1, 4)
        ]

    def _url(self, path: str, params: list[tuple[str, str]]) -> str:
        if self.rng.random() < self.buster_rate:
            params = [*params, ("_", str(int(time.time() * 1000)))]
        if self.rng.random() < self.shuffle_rate:
            params = params[::-1]
        return path + "?" + "&".join(f"{k}={v}" for k, v in params)


async def run_sim(args: argparse.Namespace) -> None:
    """Serve the simulated market-data API until interrupted."""

    sim = SimConfig(
        latency_scale=args.latency_scale, error_rate=args.error_rate, rate_429=args.rate_429
    )
    runner = await start_site(make_sim_app(sim), args.host, args.port)
    print(f"simulated market-data API on http://{args.host}:{args.port} (stats at /__stats)")
    await wait_for_signal()
    await runner.cleanup()


@dataclass
class DemoResult:
    """What a demo run measured."""

    requests: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    upstream_calls: int = 0
    hit_ratio: float = 0.0


async def demo(
    seconds: float,
    rate: float,
    alpha: float,
    port: int,
    config_path: str | Path = "config/proxy.yaml",
    latency_scale: float = 1.0,
    seed: int = 7,
    report_every: float = 5.0,
    quiet: bool = False,
) -> DemoResult:
    """Run simulator, proxy and traffic together for `seconds`; return the totals."""
    sim_port, admin_port = port + 920, port + 1
    env = {
        **os.environ,
        "YAHOO_URL": f"http://127.0.0.1:{sim_port}",
        "BRIEFINGS_URL": f"http://127.0.0.1:{sim_port}",
        "CACHEPROXY_HOST": "127.0.0.1",
        "CACHEPROXY_PORT": str(port),
        "CACHEPROXY_ADMIN_PORT": str(admin_port),
        # The simulator has no quota to protect; a cold cache at demo rates would hit 10/s.
        "YAHOO_RATE_LIMIT": os.environ.get("YAHOO_RATE_LIMIT", "500/s"),
    }
    config = load_config(config_path, env)
    sim = SimConfig(latency_scale=latency_scale, rtt_ms=30.0)  # an API a continent away
    sim_app = make_sim_app(sim, random.Random(seed))
    deps = build_deps(config)
    result = DemoResult()
    async with AsyncExitStack() as stack:  # closes, in reverse, whatever opened
        proxy = await stack.enter_async_context(ProxyApp(deps).running())
        for app, listen in (
            (sim_app, sim_port),
            (proxy.server(), port),
            (make_admin_app(deps), admin_port),
        ):
            stack.push_async_callback((await start_site(app, "127.0.0.1", listen)).cleanup)
        tasks = Tasks()
        stack.push_async_callback(tasks.close)
        say = (lambda _: None) if quiet else print
        say(f"demo: simulator :{sim_port}, proxy :{port}, admin :{admin_port}; "
            f"{rate:g} page views/s for {seconds:g}s, Zipf alpha {alpha:g}")  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession(base) as session:
            async with session.get("/briefings") as r:
                ids = [b["id"] for b in (await r.json())["briefings"]]
            rng = random.Random(seed)
            workload = Workload(rng, alpha=alpha, briefing_ids=ids)

            async def view(urls: list[str]) -> None:
                for url in urls:
                    started = time.perf_counter()
                    try:
                        async with session.get(url) as response:
                            await response.read()
                            result.errors += response.status >= 500
                    except aiohttp.ClientError:
                        result.errors += 1
                    result.latencies.append(time.perf_counter() - started)
                    result.requests += 1

            started = time.monotonic()
            next_report = started + report_every
            while (now := time.monotonic()) < started + seconds:
                tasks.spawn(view(workload.page_view()), "demo-page-view")
                await asyncio.sleep(rng.expovariate(rate))
                if now >= next_report and not quiet:
                    next_report += report_every
                    _report(now - started, result, deps.metrics.summary(), sim_app)
            await tasks.wait()
        summary = deps.metrics.summary()
        result.hit_ratio = float(summary["hit_ratio"])  # type: ignore[arg-type]
        result.upstream_calls = sim_app[SIM_STATS].total
        if not quiet:
            print("\nsummary")
            _report(seconds, result, summary, sim_app)
            print(f"  see also: curl -s localhost:{admin_port}/stats (while running)")
    return result


def _report(
    elapsed: float, result: DemoResult, summary: dict[str, object], sim_app: web.Application
) -> None:
    upstream = sim_app[SIM_STATS].total
    saved = result.requests - upstream
    p50 = statistics.median(result.latencies) * 1000 if result.latencies else 0.0
    print(
        f"  {elapsed:5.0f}s  requests {result.requests:6d}  hit ratio {summary['hit_ratio']:.3f}  "
        f"upstream calls {upstream:5d}  saved {saved:6d} "
        f"({saved / max(1, result.requests):.0%})  p50 {p50:.1f} ms  errors {result.errors}"
    )


async def run_demo(args: argparse.Namespace) -> None:
    """The `cacheproxy demo` command."""
    await demo(args.seconds, args.rate, args.alpha, args.port, args.config)
