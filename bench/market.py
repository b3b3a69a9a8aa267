"""Hit ratio, upstream calls and latency on a market workload (issue 6, item 3).

One seeded request stream per (alpha, rate) is replayed at the same moments against targets
side by side, each in front of its own simulator (`cacheproxy sim`) that counts upstream calls:

  on     cacheproxy with the shipped ttl classes (stale-while-revalidate, stale-if-error,
         refresh-ahead, closed_ttl)
  off    cacheproxy with plain TTL expiry (the same ttl, negative_ttl and closed_ttl; no
         stale windows, no refresh-ahead)
  nginx  nginx proxy_cache, its default key ($scheme$proxy_host$request_uri), the same ttl
         per route, the upstream's Cache-Control ignored (as cacheproxy ignores it)

The stream is proxy/demo.py's Workload (home, stock detail with 5-day chart and news and
sometimes another chart range, briefing detail, search over 3,000 symbols with Zipf
popularity; 20% of requests carry `_=<ms>`, 30% have their parameters reversed), with page
views arriving as a Poisson process whose mean request rate is the nominal rate.

Time is compressed by k: requests are sent k times faster and every duration in the
generated configs is divided by k (nginx TTLs too), so lambda * T, and with it every hit
ratio, is unchanged. Upstream latency is not compressed (the simulator's own, tens of ms).

Warm-up. Hit ratios are measured over a window [0, M) of (uncompressed) workload time after
a warm-up. A key's cache state depends only on that key's own requests (the L1 bound is
raised so nothing is evicted, and no rate limit applies in these runs), so the warm-up of a
TTL class only needs to be a few of its cycles long: requests of class c before -W_c are
left out of the stream (W_c = WARM_CYCLES * (ttl + stale window), at least MIN_WARM). That
keeps the replay short without changing what the window measures; the discrete-event
simulation below checks it (the `ideal` columns).

Analytical expectation (per key, Poisson arrivals at rate lambda):
  plain TTL T: a miss fetches; the entry serves hits for T; the next request after that is
  a miss. Cycles are T + Exp(lambda) long and hold 1 + Poisson(lambda T) requests, one
  of them a miss: hit = lambda T / (1 + lambda T), upstream calls = lambda / (1 + lambda T).
  ttl T + stale-while-revalidate S + refresh-ahead fraction f (f = 1 when off): the cycle
  starts at the request that fetched (a miss, a stale hit or a refresh-ahead hit); requests
  in [0, fT) are plain hits; the first request after fT triggers the next fetch, and it is
  a miss only when it comes after T + S, i.e. when the Exp(lambda) gap exceeds
  (1 - f) T + S. By memorylessness:
      hit = 1 - exp(-lambda ((1 - f) T + S)) / (1 + lambda f T)
      upstream calls = lambda / (1 + lambda f T)
  So stale-while-revalidate alone costs no extra upstream calls, while refresh-ahead
  shortens every hot key's cycle from T to fT (up to 1/f = 1.25x the calls for f = 0.8).
  lambda per key is exact: the Workload's page-view mix and Zipf probabilities enumerated
  (`model_rates`), times the page-view rate. The request-weighted mean over keys is the
  expected client-facing hit ratio; the `ideal` columns replay the generated stream through
  the same rules with zero fetch latency.

    python bench/market.py            # full sweep, ~10 minutes
    python bench/market.py --quick    # smoke run, ~2 minutes

Writes bench/results/market.json and bench/results/market.md.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    PYTHON,
    ROOT,
    Procs,
    free_port,
    need,
    nginx,
    percentile,
    processes,
    stamp,
    wait_port,
    write_results,
)
from proxy.config import Config, load_config
from proxy.demo import _RANGE_WEIGHTS, _RANGES, _REAL, Workload
from proxy.keys import CacheKey, parse_target
from proxy.policy import TTLClass
from proxy.sim import articles
from proxy.sim.data import BUCKET_S
from proxy.units import parse_duration

BASE_CONFIG = ROOT / "config" / "proxy.yaml"
SYMBOLS = 3000
WARM_CYCLES = 0.6  # warm-up per class, in (ttl + stale window)s ...
MIN_WARM = 300.0  # ... at least this many seconds of workload time ...
MAX_WARM = 1200.0  # ... and at most this many
BUSTER = re.compile(r"(?<=[?&])_=\d+")

# --------------------------------------------------------------------------------------
# Workload model: keys, classes and exact per-key rates


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A cache key as cacheproxy forms it, and the freshness its route gives it."""

    key: str
    route: str
    cls: TTLClass


class Resolver:
    """Raw request target -> cacheproxy's cache key and ttl class, with the proxy's code."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._memo: dict[str, KeyInfo] = {}

    def __call__(self, url: str) -> KeyInfo:
        url = BUSTER.sub("_=0", url)
        if (hit := self._memo.get(url)) is not None:
            return hit
        target = parse_target(url)
        match = self.config.routes.match("GET", target.path, target.params)
        assert match is not None and match.route.ttl_class is not None, url
        rules = self.config.cache.keys
        route = match.route
        key = CacheKey.of("GET", route.upstream, target, rules.ignore_params, rules.secret_params)
        info = KeyInfo(key.text, route.name, match.route.ttl_class)
        self._memo[url] = info
        return info


def briefing_ids(now: float) -> list[str]:
    """The ids the simulator's /briefings lists at `now` (they stay valid afterwards)."""
    bucket = int(now) // BUCKET_S * BUCKET_S
    newest = bucket // articles.BRIEFING_EVERY_S
    return [str(newest - k) for k in range(articles.BRIEFINGS_LISTED)]


def zipf_probabilities(n: int, alpha: float) -> list[float]:
    """proxy.demo.Zipf's distribution over ranks 0..n-1."""
    weights = [1.0 / (rank + 1) ** alpha for rank in range(n)]
    total = sum(weights)
    return [w / total for w in weights]


def model_rates(alpha: float, ids: list[str], resolve: Resolver) -> tuple[dict[str, float], float]:
    """Per cache key, the probability that one page view requests it (a key appears at most
    once per view), and the mean number of requests per view. Mirrors Workload.page_view."""
    names = [*_REAL, *(f"SYM{i:04d}" for i in range(SYMBOLS - len(_REAL)))]
    p_symbol = zipf_probabilities(len(names), alpha)
    prob: defaultdict[str, float] = defaultdict(float)

    def add(url: str, p: float) -> None:
        prob[resolve(url).key] += p

    p_home, p_detail = 0.35, 0.45
    p_brief = 0.12 if ids else 0.0
    p_search = 1.0 - p_home - p_detail - p_brief
    add("/v1/finance/trending/US?count=20", p_home * 0.7)
    add("/v1/finance/trending/KR?count=20", p_home * 0.3)
    add("/briefings", p_home)
    range_total = sum(_RANGE_WEIGHTS)
    for name, p in zip(names, p_symbol, strict=True):
        d = p_detail * p
        add(f"/v10/finance/quoteSummary/{name}?modules=price", d)
        add(f"/v8/finance/chart/{name}?range=5d&interval=15m", d)
        add(f"/v2/finance/news?symbol={name}", d)
        for chart_range, w in zip(_RANGES, _RANGE_WEIGHTS, strict=True):
            url = f"/v8/finance/chart/{name}?range={chart_range}&interval=1d"
            add(url, d * 0.35 * w / range_total)
        for n in range(1, 4):
            add(f"/v1/finance/search?q={name[:n]}&quotesCount=6", p_search * p)
    for bid, p in zip(ids, zipf_probabilities(len(ids), alpha), strict=True):
        add(f"/briefings/{bid}", p_brief * p)
    per_view = p_home * 2 + p_detail * 3.35 + p_brief + p_search * 3
    return dict(prob), per_view


@dataclass(frozen=True, slots=True)
class Fresh:
    """The freshness rules the analysis applies to one key (real seconds)."""

    ttl: float
    swr: float = 0.0
    ahead: float = 0.0  # refresh-ahead fraction, 0 = off

    def hit(self, lam: float) -> float:
        """Expected client-facing hit ratio at Poisson rate lam (see the module docstring)."""
        f = self.ahead or 1.0
        return 1.0 - math.exp(-lam * ((1.0 - f) * self.ttl + self.swr)) / (1.0 + lam * f * self.ttl)

    def calls(self, lam: float) -> float:
        """Expected upstream calls per second."""
        return lam / (1.0 + lam * (self.ahead or 1.0) * self.ttl)


def rules(cls: TTLClass, freshness: bool, closed: bool) -> Fresh:
    """What a class means for one key: ttl (closed_ttl while the market is closed), and with
    freshness on its stale-while-revalidate window and refresh-ahead fraction."""
    ttl = cls.closed_ttl if closed and cls.closed_ttl is not None else cls.ttl
    if not freshness:
        return Fresh(ttl)
    return Fresh(ttl, cls.stale_while_revalidate, cls.refresh_ahead)


# --------------------------------------------------------------------------------------
# The stream


@dataclass
class Stream:
    """Requests in time order: t in seconds of workload time (warm-up t < 0)."""

    alpha: float
    rate: float
    measure: float
    pv_rate: float
    t: list[float] = field(default_factory=list)
    url: list[str] = field(default_factory=list)
    key: list[str] = field(default_factory=list)
    cls: list[TTLClass] = field(default_factory=list)
    route: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.t)

    def measured(self) -> int:
        """How many requests fall in the measurement window."""
        return sum(1 for t in self.t if t >= 0)


def warm_for(cls: TTLClass, closed: bool, closed_warm: float) -> float:
    """How far before the window a class's requests start (module docstring, Warm-up)."""
    if closed and cls.closed_ttl is not None:
        return closed_warm
    return min(MAX_WARM, max(MIN_WARM, WARM_CYCLES * (cls.ttl + cls.stale_while_revalidate)))


def make_stream(
    alpha: float,
    rate: float,
    measure: float,
    resolve: Resolver,
    ids: list[str],
    seed: int,
    closed: bool = False,
    closed_warm: float = 3600.0,
) -> Stream:
    """One deterministic stream: Workload page views at a Poisson rate giving `rate` req/s."""
    pv_rate = rate / _per_view(ids)
    stream = Stream(alpha, rate, measure, pv_rate)
    classes = {c.name: c for c in resolve.config.ttl_classes.values()}
    start = -max(warm_for(c, closed, closed_warm) for c in classes.values())
    workload = Workload(random.Random(seed), alpha=alpha, symbols=SYMBOLS, briefing_ids=ids)
    arrivals = random.Random(seed + 1)
    t = start
    while True:
        t += arrivals.expovariate(pv_rate)
        if t >= measure:
            break
        for url in workload.page_view():
            info = resolve(url)
            if t < -warm_for(info.cls, closed, closed_warm):
                continue
            # deterministic cache-busters: the request's own time in ms
            url = BUSTER.sub(f"_={1_700_000_000_000 + int((t - start) * 1000)}", url)
            stream.t.append(t)
            stream.url.append(url)
            stream.key.append(info.key)
            stream.cls.append(info.cls)
            stream.route.append(info.route)
    return stream


def _per_view(ids: list[str]) -> float:
    p_brief = 0.12 if ids else 0.0
    return 0.35 * 2 + 0.45 * 3.35 + p_brief + (1.0 - 0.35 - 0.45 - p_brief) * 3


# --------------------------------------------------------------------------------------
# Expectations: analytical (exact rates) and ideal (the stream through the same rules)


def analytical(
    alpha: float, rate: float, ids: list[str], resolve: Resolver, closed: bool
) -> dict[str, float]:
    """Request-weighted expected hit ratio and upstream calls/min for on, off (and nginx's
    default key, estimated: busters never hit, reversed parameter order is another key)."""
    prob, per_view = model_rates(alpha, ids, resolve)
    pv_rate = rate / per_view
    out = {"hit_on": 0.0, "hit_off": 0.0, "calls_on": 0.0, "calls_off": 0.0}
    info_by_key = {info.key: info for info in resolve._memo.values()}
    total = 0.0
    by_route: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for k, p in prob.items():
        lam = pv_rate * p
        info = info_by_key[k]
        on, off = rules(info.cls, True, closed), rules(info.cls, False, closed)
        out["hit_on"] += lam * on.hit(lam)
        out["hit_off"] += lam * off.hit(lam)
        out["calls_on"] += on.calls(lam)
        out["calls_off"] += off.calls(lam)
        by_route[info.route][0] += lam * on.hit(lam)
        by_route[info.route][1] += lam
        total += lam
    out["hit_on"] /= total
    out["hit_off"] /= total
    for route, (hits, lam) in sorted(by_route.items()):
        out[f"hit_on_{route}"] = hits / lam
        out[f"share_{route}"] = lam / total
    out["calls_on"] *= 60
    out["calls_off"] *= 60
    out["rate"] = total
    return out


def ideal(
    stream: Stream, freshness: bool, closed: bool, nginx_keys: bool = False
) -> dict[str, float]:
    """Replay the stream through the analysis' rules with zero fetch latency: hit ratio and
    upstream calls/min in the window. nginx_keys: key on the raw URL (plain TTL)."""
    stored: dict[str, float] = {}
    hits = requests = calls = 0
    by_route: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for t, url, key, cls, route in zip(
        stream.t, stream.url, stream.key, stream.cls, stream.route, strict=True
    ):
        r = rules(cls, freshness and not nginx_keys, closed)
        k = url if nginx_keys else key
        at = stored.get(k)
        age = math.inf if at is None else t - at
        f = r.ahead or 1.0
        if age < f * r.ttl:
            hit, fetch = True, False
        elif age < r.ttl + r.swr:
            hit, fetch = True, True  # refresh-ahead or stale-while-revalidate
        else:
            hit, fetch = False, True
        if fetch:
            stored[k] = t
        if t >= 0:
            requests += 1
            hits += hit
            calls += fetch
            by_route[route][0] += hit
            by_route[route][1] += 1
    return {
        "hit": hits / max(1, requests),
        "calls_per_min": calls / (stream.measure / 60),
        **{f"hit_{r}": h / n for r, (h, n) in sorted(by_route.items())},
    }


# --------------------------------------------------------------------------------------
# Configs: cacheproxy's from config/proxy.yaml with every duration / k; nginx's alike

_DURATIONS = ("ttl", "negative_ttl", "stale_while_revalidate", "stale_if_error", "closed_ttl")
_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def calendar(market_open: bool, now: float | None = None) -> dict[str, Any]:
    """A market whose session covers, or excludes, the next several hours from now.

    proxy/market.py reads the wall clock, so the run picks a time zone in which it is about
    noon: open 00:00-23:59 every day (open), or trading only on the weekday three days
    ahead (closed, so the next open is days away and closed_ttl alone bounds lifetimes).
    """
    now = time.time() if now is None else now
    offset = 12 - time.gmtime(now).tm_hour  # hours east of UTC that make it about noon
    zone = "Etc/GMT" if offset == 0 else f"Etc/GMT{-offset:+d}"  # POSIX signs are inverted
    local_day = time.gmtime(now + offset * 3600).tm_wday
    days = list(_WEEKDAYS) if market_open else [_WEEKDAYS[(local_day + 3) % 7]]
    return {"timezone": zone, "open": "00:00", "close": "23:59", "weekdays": days,
            "holidays": []}  # fmt: skip


def proxy_config(
    k: float,
    freshness: bool,
    market_open: bool,
    sim_port: int,
    port: int,
    admin_port: int,
    rate_limit: str | None = None,
) -> dict[str, Any]:
    """config/proxy.yaml for one target: durations / k, upstreams at the simulator, an L1
    big enough that nothing is evicted, and no rate limit unless asked for."""
    conf: dict[str, Any] = yaml.safe_load(BASE_CONFIG.read_text())
    server = conf["server"]
    server.update(host="127.0.0.1", port=port, admin_port=admin_port, log_level="warning")
    server.pop("admin_token", None)
    for upstream in conf["upstreams"].values():
        upstream["url"] = f"http://127.0.0.1:{sim_port}"
        upstream.pop("rate_limit", None)
    if rate_limit is not None:
        # one upstream (the simulator) behind one limit: route briefings through yahoo too
        conf["upstreams"]["yahoo"]["rate_limit"] = rate_limit
        del conf["upstreams"]["briefings"]
        for route in conf["routes"]:
            route["upstream"] = "yahoo"
    for name, market in conf.get("markets", {}).items():
        settle = parse_duration(market.get("settle", 30)) / k
        conf["markets"][name] = {**calendar(market_open), "settle": settle}
    classes = conf["ttl_classes"]
    for name, cls in list(classes.items()):
        cls = dict(cls) if isinstance(cls, dict) else {"ttl": cls}
        ttl = parse_duration(cls["ttl"])
        cls.setdefault("negative_ttl", min(ttl, 60.0))  # the default, before scaling
        out = {f: parse_duration(cls[f]) / k for f in _DURATIONS if f in cls}
        out.update({f: cls[f] for f in ("market", "refresh_ahead") if f in cls})
        if not freshness:
            out = {f: v for f, v in out.items() if f in ("ttl", "negative_ttl", "closed_ttl",
                                                        "market")}  # fmt: skip
        classes[name] = out
    conf["cache"]["l1"] = {"max_entries": 1_000_000, "max_memory": "4GB"}
    return conf


# nginx locations per route (its prefix-location model; chart routes split by ?range=)
_NGINX_CHART_RANGES = {"chart_5d": "1d|5d", "chart_3mo_plus": "3mo|6mo|ytd|1y|2y|5y|10y|max"}


def nginx_extra(config: Config, k: float) -> str:
    """Directives for common.nginx's location: per route, proxy_cache_valid = ttl / k
    (whole seconds: k divides every ttl), the upstream's Cache-Control ignored."""

    def ttl(route: str) -> int:
        cls = next(r.ttl_class for r in config.routes if r.name == route)
        assert cls is not None
        seconds = cls.ttl / k
        assert seconds == int(seconds), f"k={k} must divide {route}'s ttl"
        return int(seconds)

    def loc(where: str, route: str, body: str = "") -> str:
        return (f"location {where} {{ {body} proxy_pass http://api; "
                f"proxy_cache_valid 200 {ttl(route)}s; }}")  # fmt: skip

    lines = [
        "proxy_ignore_headers Cache-Control Expires;",
        loc("/v1/finance/trending/", "trending"),
        loc("/v10/finance/quoteSummary/", "stock_detail"),
        loc("/v2/finance/news", "news"),
        loc("/v1/finance/search", "search"),
        loc("= /briefings", "briefing_list"),
        loc("/briefings/", "briefing_detail"),
    ]
    # A location cannot test the query: chart ranges go to internal locations by rewrite,
    # which leaves $request_uri, and so the cache key, as the client sent it.
    ifs = " ".join(
        f'if ($arg_range ~ "^({ranges})$") {{ rewrite ^ /__{route}$uri last; }}'
        for route, ranges in _NGINX_CHART_RANGES.items()
    )
    lines.append(loc("/v8/finance/chart/", "chart_1mo", ifs))
    for route in _NGINX_CHART_RANGES:
        body = f"internal; rewrite ^/__{route}(/.*)$ $1 break;"
        lines.append(loc(f"/__{route}/", route, body))
    return "\n            ".join(lines)


# --------------------------------------------------------------------------------------
# Replaying a stream


@dataclass
class Target:
    """One system under test and the simulator behind it."""

    name: str
    port: int
    sim_port: int
    hit: Callable[[Any], bool]  # response headers -> client-facing hit?
    hits: bytearray = field(default_factory=bytearray)
    status: list[int] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)


def cacheproxy_hit(headers: Any) -> bool:
    """Cache-Status `cacheproxy; hit` (fresh, stale-while-revalidate, stale-if-error)."""
    return "; hit" in headers.get("Cache-Status", "")


def nginx_hit(headers: Any) -> bool:
    """X-Cache HIT, STALE, UPDATING or REVALIDATED."""
    return headers.get("X-Cache", "") in ("HIT", "STALE", "UPDATING", "REVALIDATED")


async def sim_total(session: aiohttp.ClientSession, port: int) -> int:
    """A simulator's upstream call count so far."""
    async with session.get(f"http://127.0.0.1:{port}/__stats") as r:
        return int((await r.json())["total"])


async def replay(stream: Stream, targets: list[Target], k: float) -> dict[str, Any]:
    """Send every request at its (compressed) time to every target at once. Returns the
    simulators' call counts over the window and how late the generator ran."""
    from yarl import URL

    n = len(stream)
    for target in targets:
        target.hits = bytearray(n)
        target.status = [0] * n
        target.latency = [0.0] * n
    timeout = aiohttp.ClientTimeout(total=30)
    sessions = [
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256), auto_decompress=False, timeout=timeout
        )
        for _ in targets
    ]
    control = aiohttp.ClientSession()
    urls = [
        [URL(f"http://127.0.0.1:{t.port}{u}", encoded=True) for u in stream.url] for t in targets
    ]
    headers = {"Accept-Encoding": "gzip"}

    async def one(ti: int, i: int) -> None:
        target = targets[ti]
        started = time.perf_counter()
        try:
            async with sessions[ti].get(urls[ti][i], headers=headers) as r:
                await r.read()
                target.status[i] = r.status
                target.hits[i] = target.hit(r.headers)
        except (aiohttp.ClientError, TimeoutError):
            target.status[i] = 599
        target.latency[i] = time.perf_counter() - started

    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()
    lags: list[float] = []
    start = stream.t[0]
    calls_before: list[int] = []
    t0 = loop.time() + 0.2
    i = 0
    try:
        while i < n:
            due = t0 + (stream.t[i] - start) / k
            if (delay := due - loop.time()) > 0:
                await asyncio.sleep(delay)
            now = loop.time()
            while i < n and t0 + (stream.t[i] - start) / k <= now:
                if stream.t[i] >= 0 and not calls_before:
                    calls_before = await asyncio.gather(*(sim_total(control, t.sim_port)
                                                          for t in targets))  # fmt: skip
                lags.append(now - (t0 + (stream.t[i] - start) / k))
                for ti in range(len(targets)):
                    task = asyncio.ensure_future(one(ti, i))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                i += 1
        if pending:
            await asyncio.wait(list(pending))
        await asyncio.sleep(0.5)  # background refreshes started by the last requests
        calls_after = await asyncio.gather(*(sim_total(control, t.sim_port) for t in targets))
    finally:
        for s in (*sessions, control):
            await s.close()
    return {
        "calls": [a - b for a, b in zip(calls_after, calls_before, strict=True)],
        "lag_p99_ms": percentile(lags, 99) * 1000,
        "lag_max_ms": max(lags) * 1000,
        "wall_s": loop.time() - t0,
    }


# --------------------------------------------------------------------------------------
# One run: simulators, targets, replay, numbers


def start_sim(procs: Procs) -> int:
    """A simulator (its own process, default latency) on a free port."""
    port = free_port()
    procs.spawn([PYTHON, "-m", "proxy", "sim", "--port", str(port), "--log-level", "warning"])
    return port


def start_proxy(procs: Procs, directory: Path, conf: dict[str, Any]) -> None:
    """cacheproxy serving conf, written to directory."""
    path = directory / f"proxy-{conf['server']['port']}.yaml"
    path.write_text(yaml.safe_dump(conf, sort_keys=False))
    load_config(path)  # fail here, with the field named, rather than in the child
    procs.proxy(path)


def run_once(
    stream: Stream, k: float, names: Iterable[str], market_open: bool, base: Config
) -> dict[str, dict[str, float]]:
    """Replay `stream` against fresh targets (cold caches); per target its numbers."""
    with processes() as procs, tempfile.TemporaryDirectory(prefix="market-") as tmp:
        directory = Path(tmp)
        targets: list[Target] = []
        for name in names:
            sim = start_sim(procs)
            port = free_port()
            if name == "nginx":
                nginx(procs, directory / "nginx", port, sim, extra=nginx_extra(base, k))
                targets.append(Target(name, port, sim, nginx_hit))
            else:
                conf = proxy_config(k, name == "on", market_open, sim, port, free_port())
                start_proxy(procs, directory, conf)
                targets.append(Target(name, port, sim, cacheproxy_hit))
        for target in targets:
            wait_port(target.sim_port)
            wait_port(target.port)
        meta = asyncio.run(replay(stream, targets, k))
    window = [i for i, t in enumerate(stream.t) if t >= 0]
    minutes = stream.measure / 60
    out: dict[str, dict[str, float]] = {}
    for target, calls in zip(targets, meta["calls"], strict=True):
        latencies = [target.latency[i] * 1000 for i in window]
        by_route: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for i in window:
            by_route[stream.route[i]][0] += target.hits[i]
            by_route[stream.route[i]][1] += 1
        out[target.name] = {
            "hit": sum(target.hits[i] for i in window) / len(window),
            "calls_per_min": calls / minutes,
            "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99),
            "errors": sum(1 for i in window if target.status[i] >= 500),
            "requests": len(window),
            **{f"hit_{r}": h / c for r, (h, c) in sorted(by_route.items())},
        }
    out["_run"] = {key: float(v) for key, v in meta.items() if key != "calls"}
    out["_run"]["k"] = k
    return out


# --------------------------------------------------------------------------------------
# Market-open burst against a rate-limited upstream


async def _burst_replay(
    times: list[float], urls: list[str], proxy_port: int, sim_port: int
) -> dict[str, Any]:
    """Send urls[i] at wall offset times[i]; per request its status, and whether its key
    already had a 200 (so the proxy holds a copy: the L1 evicts nothing and stale-if-error
    outlasts the run). Then the simulator's calls per clock second."""
    from yarl import URL

    n = len(times)
    status = [0] * n
    had_copy = [False] * n
    resolve_key = {u: BUSTER.sub("", u) for u in urls}  # key stand-in: buster dropped
    stored: set[str] = set()
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=512), auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=30),
    )  # fmt: skip
    keys = [resolve_key[u] for u in urls]

    async def one(i: int) -> None:
        had_copy[i] = keys[i] in stored
        try:
            url = URL(f"http://127.0.0.1:{proxy_port}{urls[i]}", encoded=True)
            async with session.get(url, headers={"Accept-Encoding": "gzip"}) as r:
                await r.read()
                status[i] = r.status
        except (aiohttp.ClientError, TimeoutError):
            status[i] = 599
        if status[i] == 200:
            stored.add(keys[i])

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    tasks = []
    try:
        for i, t in enumerate(times):
            if (delay := t0 + t - loop.time()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(i)))
        await asyncio.gather(*tasks)
        async with session.get(f"http://127.0.0.1:{sim_port}/__stats?seconds=1") as r:
            per_second = {int(s): c for s, c in (await r.json())["by_second"].items()}
    finally:
        await session.close()
    return {"status": status, "had_copy": had_copy, "per_second": per_second}


def run_burst(
    k: float, base_rate: float, factor: float, limit: float, after_open: float, seed: int
) -> dict[str, Any]:
    """cacheproxy (freshness on) whose one upstream is limited to `limit` req/s of real
    time; traffic at base_rate while the market is closed, then factor x base_rate from the
    open for `after_open` seconds (real time; the run is compressed by k like the others).
    Entries fetched while closed all expire together at open + settle."""
    now = time.time()
    open_at = (int(now + 20) // 60 + 1) * 60  # market hours are whole minutes
    zone = calendar(True, now)["timezone"]
    offset = 0 if zone == "Etc/GMT" else -int(zone[7:])
    local = time.gmtime(open_at + offset * 3600)
    ids = briefing_ids(now)
    workload = Workload(random.Random(seed), alpha=1.0, symbols=SYMBOLS, briefing_ids=ids)
    arrivals = random.Random(seed + 1)
    per_view = _per_view(ids)
    with processes() as procs, tempfile.TemporaryDirectory(prefix="market-burst-") as tmp:
        sim = start_sim(procs)
        port = free_port()
        conf = proxy_config(k, True, True, sim, port, free_port(), rate_limit=f"{limit * k:g}/s")
        conf["upstreams"]["yahoo"]["rate_limit_wait"] = parse_duration("2s") / k
        conf["markets"]["us"].update(open=f"{local.tm_hour:02d}:{local.tm_min:02d}")
        start_proxy(procs, Path(tmp), conf)
        wait_port(sim)
        wait_port(port)
        start = time.time()
        opens = open_at - start  # wall seconds from the first request
        end = opens + after_open / k
        times: list[float] = []
        urls: list[str] = []
        t = 0.0
        while True:
            rate = base_rate * k * (factor if t >= opens else 1.0)
            t += arrivals.expovariate(rate / per_view)
            if t >= end:
                break
            for url in workload.page_view():
                times.append(t)
                urls.append(BUSTER.sub(f"_={1_700_000_000_000 + int(t * 1000)}", url))
        out = asyncio.run(_burst_replay(times, urls, port, sim))
    per_second = out["per_second"]
    first, last = int(start), int(start + end)
    counts = [per_second.get(s, 0) for s in range(first, last + 1)]
    after = [per_second.get(s, 0) for s in range(int(open_at), last + 1)]
    status, had_copy = out["status"], out["had_copy"]
    errors = [i for i, s in enumerate(status) if s >= 500 or s == 429]
    return {
        "k": k,
        "limit_per_s": limit,
        "limit_per_wall_s": limit * k,
        "requests": len(times),
        "requests_after_open": sum(1 for t in times if t >= opens),
        "max_upstream_per_wall_s": max(counts),
        "max_upstream_per_wall_s_after_open": max(after) if after else 0,
        "upstream_per_wall_s_after_open": after,
        "errors": len(errors),
        "errors_with_stale_copy": sum(1 for i in errors if had_copy[i]),
        "errors_without_copy": sum(1 for i in errors if not had_copy[i]),
        "seconds_before_open": opens,
    }


# --------------------------------------------------------------------------------------
# The sweep and the report

TARGET = (1.0, 10.0)  # alpha, req/s: the point the issue's targets are stated for
ALPHAS = (0.7, 1.0, 1.2)
RATES = (2.0, 10.0, 20.0)


def pick_k(rate: float, budget: float) -> float:
    """The largest k with rate * k <= budget req/s that keeps 300 s / k whole seconds
    (nginx's proxy_cache_valid takes whole seconds)."""
    candidates = [300 / n for n in range(1, 301) if rate * 300 / n <= budget]
    return max(candidates) if candidates else 1.0


@dataclass
class Point:
    """One (alpha, rate, open/closed) point: its streams per rep, expectations, runs."""

    alpha: float
    rate: float
    market_open: bool
    measure: float
    names: tuple[str, ...]
    budget: float
    runs: list[dict[str, Any]] = field(default_factory=list)
    expect: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        hours = "open" if self.market_open else "closed"
        return f"alpha {self.alpha:g}, {self.rate:g} req/s, market {hours}"


def run_point(point: Point, rep: int, base: Config, resolve: Resolver, ids: list[str]) -> None:
    """Generate this rep's stream, compute its expectations, replay it, keep the numbers."""
    seed = 1000 * rep + int(point.alpha * 10) + int(point.rate) * 100
    closed = not point.market_open
    stream = make_stream(point.alpha, point.rate, point.measure, resolve, ids, seed,
                         closed=closed, closed_warm=CLOSED_WARM)  # fmt: skip
    k = pick_k(point.rate, point.budget)
    on, off = ideal(stream, True, closed), ideal(stream, False, closed)
    expect = {
        "ideal_on": on["hit"],
        "ideal_off": off["hit"],
        "ideal_nginx": ideal(stream, False, closed, nginx_keys=True)["hit"],
        "ideal_calls_on": on["calls_per_min"],
        "ideal_calls_off": off["calls_per_min"],
        **{f"ideal_on_{k[4:]}": v for k, v in on.items() if k.startswith("hit_")},
    }
    started = time.monotonic()
    result = run_once(stream, k, point.names, point.market_open, base)
    result["_run"]["seconds"] = time.monotonic() - started
    result["_run"]["seed"] = seed
    result["_expect"] = expect
    point.runs.append(result)
    on = result["on"]
    print(f"  {point.label} rep {rep}: k={k:g} hit on {on['hit']:.3f} (ideal "
          f"{expect['ideal_on']:.3f}, analytical {point.expect['hit_on']:.3f}), off "
          f"{result['off']['hit']:.3f}" + (f", nginx {result['nginx']['hit']:.3f}"
          if "nginx" in result else "") + f"; {result['_run']['seconds']:.0f} s, lag p99 "
          f"{result['_run']['lag_p99_ms']:.0f} ms", flush=True)  # fmt: skip


CLOSED_WARM = 3600.0  # outside trading hours, the window starts an hour after the close


def med(values: Iterable[float]) -> float:
    """Median, nan for nothing."""
    values = list(values)
    return statistics.median(values) if values else float("nan")


def summarise(point: Point) -> dict[str, Any]:
    """Medians over reps; differences and ratios computed within each rep first."""
    runs = point.runs
    out: dict[str, Any] = {"alpha": point.alpha, "rate": point.rate,
                           "market_open": point.market_open, "reps": len(runs),
                           "measure_s": point.measure, "k": runs[0]["_run"]["k"],
                           "analytical": point.expect}  # fmt: skip
    for name in point.names:
        out[name] = {m: med(r[name][m] for r in runs) for m in runs[0][name]}
    for m in runs[0]["_expect"]:
        out[m] = med(r["_expect"][m] for r in runs)
    out["on_minus_analytical"] = med(r["on"]["hit"] - point.expect["hit_on"] for r in runs)
    out["off_minus_analytical"] = med(r["off"]["hit"] - point.expect["hit_off"] for r in runs)
    out["on_minus_ideal"] = med(r["on"]["hit"] - r["_expect"]["ideal_on"] for r in runs)
    out["calls_on_over_off"] = med(
        r["on"]["calls_per_min"] / max(1e-9, r["off"]["calls_per_min"]) for r in runs
    )
    if "nginx" in point.names:
        out["on_minus_nginx"] = med(r["on"]["hit"] - r["nginx"]["hit"] for r in runs)
    out["lag_p99_ms"] = med(r["_run"]["lag_p99_ms"] for r in runs)
    out["seconds"] = sum(r["_run"]["seconds"] for r in runs)
    return out


def fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x != x else f"{x:.{digits}f}"


def targets(points: list[dict[str, Any]], burst: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """Each issue-6 target for this workload: (target, met, what was measured)."""
    target = next(p for p in points if p["market_open"] and (p["alpha"], p["rate"]) == TARGET)
    closed = next(p for p in points if not p["market_open"])
    a = target["analytical"]
    return [
        ("trading hours, 10 req/s, alpha 1.0: hit ratio >= 0.75",
         target["on"]["hit"] >= 0.75, f"{fmt(target['on']['hit'])}"),
        ("... within 0.02 of the analytical value (ttl + stale windows + refresh-ahead)",
         abs(target["on_minus_analytical"]) <= 0.02,
         f"{fmt(target['on']['hit'])} vs {fmt(a['hit_on'])}: "
         f"{target['on_minus_analytical']:+.3f} (vs this stream's ideal "
         f"{target['on_minus_ideal']:+.3f})"),
        ("... at least 0.15 above nginx proxy_cache (default key)",
         target["on_minus_nginx"] >= 0.15, f"{target['on_minus_nginx']:+.3f} "
         f"({fmt(target['on']['hit'])} vs {fmt(target['nginx']['hit'])})"),
        ("... upstream calls <= 1.1x plain TTL expiry",
         target["calls_on_over_off"] <= 1.1, f"{target['calls_on_over_off']:.3f}x "
         f"(analytical {a['calls_on'] / a['calls_off']:.3f}x)"),
        ("outside trading hours (closed_ttl): hit ratio >= 0.95",
         closed["on"]["hit"] >= 0.95, f"{fmt(closed['on']['hit'])} in a window "
         f"{CLOSED_WARM / 3600:g} h after the close (its ideal {fmt(closed['ideal_on'])}; "
         f"steady state, analytical: {fmt(closed['analytical']['hit_on'])})"),
        (f"8x market-open burst, upstream limited to {burst['limit_per_s']:g} req/s: never more",
         burst["max_upstream_per_wall_s"] <= burst["limit_per_wall_s"],
         f"max {burst['max_upstream_per_wall_s']} per second of the run = "
         f"{burst['max_upstream_per_wall_s'] / burst['k']:g} req/s of real time"),
        ("... no client error for a key with a stale copy",
         burst["errors_with_stale_copy"] == 0,
         f"{burst['errors_with_stale_copy']} (errors for keys never fetched: "
         f"{burst['errors_without_copy']} of {burst['requests_after_open']} after the open)"),
    ]  # fmt: skip


def report(points: list[dict[str, Any]], burst: dict[str, Any], args: argparse.Namespace,
           elapsed: float) -> str:  # fmt: skip
    """The markdown: targets first, then the sweep, then what the numbers mean."""
    target = next(p for p in points if p["market_open"] and (p["alpha"], p["rate"]) == TARGET)
    closed = next(p for p in points if not p["market_open"])
    a = target["analytical"]
    checks = targets(points, burst)
    lines = [
        "# Market workload: hit ratio, upstream calls, latency",
        "",
        f"{stamp()}; `python bench/market.py{' --quick' if args.quick else ''}` "
        f"({elapsed / 60:.0f} min). Medians over interleaved repetitions; differences and "
        "ratios are computed within a repetition, then the median taken.",
        "",
        "## Targets",
        "",
        "| target | met | measured |",
        "| --- | --- | --- |",
        *(f"| {name} | {'yes' if ok else '**no**'} | {detail} |" for name, ok, detail in checks),
        "",
        "## Trading hours: hit ratio",
        "",
        "`analytical`: per key lambda from the workload model (module docstring); `ideal`: "
        "this run's own stream through the same rules with zero fetch latency; `measured`: "
        "client-facing (Cache-Status hit, nginx X-Cache HIT).",
        "",
        "| alpha | req/s | k | reps | analytical on | ideal on | measured on | "
        "analytical off | ideal off | measured off | ideal nginx | measured nginx | "
        "on - nginx |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in points:
        if not p["market_open"]:
            continue
        ng = p.get("nginx", {})
        lines.append(
            f"| {p['alpha']:g} | {p['rate']:g} | {p['k']:g} | {p['reps']} | "
            f"{fmt(p['analytical']['hit_on'])} | {fmt(p['ideal_on'])} | {fmt(p['on']['hit'])} | "
            f"{fmt(p['analytical']['hit_off'])} | {fmt(p['ideal_off'])} | "
            f"{fmt(p['off']['hit'])} | {fmt(p['ideal_nginx'])} | "
            f"{fmt(ng.get('hit', float('nan')))} | "
            f"{fmt(p.get('on_minus_nginx', float('nan')))} |"
        )
    lines += [
        "",
        "## Trading hours: upstream calls per minute (of real time) and latency",
        "",
        "| alpha | req/s | calls on | calls off | calls nginx | on / off | analytical on / off "
        "| p50 on / off / nginx ms | p99 on / off / nginx ms | errors | lag p99 ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in points:
        if not p["market_open"]:
            continue
        names = [n for n in ("on", "off", "nginx") if n in p]
        an = p["analytical"]
        lines.append(
            f"| {p['alpha']:g} | {p['rate']:g} | {p['on']['calls_per_min']:.1f} | "
            f"{p['off']['calls_per_min']:.1f} | "
            f"{p['nginx']['calls_per_min'] if 'nginx' in p else float('nan'):.1f} | "
            f"{p['calls_on_over_off']:.3f} | {an['calls_on'] / an['calls_off']:.3f} | "
            + " / ".join(f"{p[n]['p50_ms']:.1f}" for n in names)
            + " | "
            + " / ".join(f"{p[n]['p99_ms']:.0f}" for n in names)
            + " | "
            + " / ".join(f"{p[n]['errors']:.0f}" for n in names)
            + f" | {p['lag_p99_ms']:.0f} |"
        )
    routes = sorted(k[4:] for k in target["on"] if k.startswith("hit_"))
    ca = closed["analytical"]

    def closed_miss(route: str) -> float:
        return float(ca["share_" + route] * (1 - ca["hit_on_" + route]))

    lines += [
        "",
        "## Per route, trading hours, alpha 1.0, 10 req/s",
        "",
        "| route | share | analytical on | ideal on | measured on | measured off | "
        "measured nginx |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *(
            f"| {r} | {a.get('share_' + r, float('nan')):.3f} | "
            f"{fmt(a.get('hit_on_' + r, float('nan')))} | "
            f"{fmt(target.get('ideal_on_' + r, float('nan')))} | {fmt(target['on']['hit_' + r])} | "
            f"{fmt(target['off']['hit_' + r])} | {fmt(target['nginx']['hit_' + r])} |"
            for r in routes
        ),
        "",
        "## Outside trading hours (closed_ttl)",
        "",
        f"The market calendar excludes the run; the window starts {CLOSED_WARM / 3600:g} h "
        "after the close (market-bound classes have seen that hour; the others their usual "
        "warm-up). `analytical` is the steady state deep in the night (lifetime "
        "closed_ttl); `ideal` is this window's own expectation.",
        "",
        "| | analytical (steady) | ideal (this window) | measured | calls/min |",
        "| --- | --- | --- | --- | --- |",
        f"| on | {fmt(closed['analytical']['hit_on'])} | {fmt(closed['ideal_on'])} | "
        f"{fmt(closed['on']['hit'])} | {closed['on']['calls_per_min']:.1f} |",
        f"| off | {fmt(closed['analytical']['hit_off'])} | {fmt(closed['ideal_off'])} | "
        f"{fmt(closed['off']['hit'])} | {closed['off']['calls_per_min']:.1f} |",
        "",
        "Steady-state misses by route (share of all requests): "
        + ", ".join(f"{r} {miss:.3f}" for r in routes if (miss := closed_miss(r)) >= 0.001)
        + ".",
        "",
        "## Market-open burst",
        "",
        f"cacheproxy (freshness on), its one upstream limited to {burst['limit_per_s']:g} "
        f"req/s (`rate_limit: {burst['limit_per_wall_s']:g}/s` at k={burst['k']:g}); "
        f"{burst['seconds_before_open']:.0f} s of the run at 10 req/s while closed, then "
        "80 req/s from the open. Everything fetched while closed expires together at open + "
        "settle. Upstream calls per second of the run after the open (the simulator's "
        f"count): {burst['upstream_per_wall_s_after_open']}.",
        "",
        "## Method",
        "",
        f"proxy/ as of {provenance()}. Every run starts fresh processes (cold caches); the "
        "L1 bound is raised so nothing is evicted; no rate limit except in the burst.",
        "",
        "```text",
        *(__doc__ or "").split("\n\n    python")[0].splitlines(),
        "```",
    ]
    return "\n".join(lines)


def provenance() -> str:
    """The commit, and which proxy/ files differ from it in the working tree."""
    import subprocess

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True).stdout

    commit = git("rev-parse", "--short", "HEAD").strip()
    changed = git("status", "--porcelain", "--", "proxy").split()
    changed = [c for c in changed if c.endswith(".py")]
    return f"commit {commit}" + (f", with uncommitted {', '.join(changed)}" if changed else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="the target point only, ~2 min")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of the target point")
    parser.add_argument("--budget", type=float, default=200.0,
                        help="requests/s the replay may send to each target")  # fmt: skip
    args = parser.parse_args()
    need("nginx")
    started = time.monotonic()
    base = load_config(BASE_CONFIG, {})
    resolve = Resolver(base)
    ids = briefing_ids(time.time())
    three, two = ("on", "off", "nginx"), ("on", "off")
    measure = 300.0 if args.quick else 600.0
    target = Point(*TARGET, True, measure, three, args.budget)
    closed = Point(*TARGET, False, measure, two, args.budget * 1.5)
    global CLOSED_WARM
    if args.quick:
        CLOSED_WARM = 1200.0
    others = [] if args.quick else [
        Point(a, r, True, 300.0, three, args.budget * 1.25)
        for a in ALPHAS for r in RATES if (a, r) != TARGET
    ]  # fmt: skip
    points = [target, *others, closed]
    for p in points:
        p.expect = analytical(p.alpha, p.rate, ids, resolve, closed=not p.market_open)
    reps = 1 if args.quick else args.reps
    for rep in range(reps):
        print(f"repetition {rep + 1} of {reps}", flush=True)
        run_point(target, rep, base, resolve, ids)
        if rep < max(1, reps - 1):
            run_point(closed, rep, base, resolve, ids)
        if rep == 0:
            for p in others:
                run_point(p, rep, base, resolve, ids)
    print("market-open burst", flush=True)
    burst = run_burst(3.0, 10.0, 8.0, 10.0, 60.0 if args.quick else 180.0, seed=5)
    summaries = [summarise(p) for p in points]
    elapsed = time.monotonic() - started
    command = f"python bench/market.py{' --quick' if args.quick else ''}"
    data = {
        "meta": {"date": stamp(), "command": command, "minutes": elapsed / 60},
        "targets": [{"target": t, "met": met, "measured": m}
                    for t, met, m in targets(summaries, burst)],
        "points": summaries, "burst": burst, "runs": {p.label: p.runs for p in points},
    }  # fmt: skip
    write_results("market", data, report(summaries, burst, args, elapsed))


if __name__ == "__main__":
    main()
