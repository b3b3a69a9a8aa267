"""Metrics(registry): owns every Prometheus series and the counts behind /stats."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Sized
from itertools import accumulate
from typing import Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from proxy.breaker import STATE_VALUES, CircuitBreaker
from proxy.outcome import CACHEABLE_OUTCOMES, OUTCOMES, SAVED_OUTCOMES
from proxy.quotashare import Standing
from proxy.store.base import StoreStats

UNMATCHED: Final = "unmatched"
_LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
)  # fmt: skip


class _Observable(Protocol):
    """What a store must expose to be watched (MemoryStore and RedisStore fit)."""

    stats: StoreStats


class _StoreCollector(Collector):
    """Reads stores' sizes and counters and the L2 breaker at scrape time, so the hot path
    does no bookkeeping for them."""

    def __init__(self) -> None:
        self.stores: dict[str, _Observable] = {}
        self.breaker: CircuitBreaker | None = None

    def collect(self) -> Iterator[Metric]:
        entries = GaugeMetricFamily("cacheproxy_cache_entries", "Entries held", labels=["layer"])
        size = GaugeMetricFamily(
            "cacheproxy_cache_bytes", "Bytes held (body + headers)", labels=["layer"]
        )
        for layer, store in self.stores.items():
            if isinstance(store, Sized) and hasattr(store, "bytes"):  # L1 knows; L2 would scan
                entries.add_metric([layer], len(store))
                size.add_metric([layer], store.bytes)
        yield entries
        yield size
        for field, doc in _STORE_COUNTERS:
            counter = CounterMetricFamily(f"cacheproxy_cache_{field}", doc, labels=["layer"])
            for layer, store in self.stores.items():
                counter.add_metric([layer], getattr(store.stats, field))
            yield counter
        if self.breaker is not None:
            state = GaugeMetricFamily(
                "cacheproxy_l2_breaker_state", "L2 circuit breaker: 0 closed, 1 open, 2 half-open"
            )
            state.add_metric([], STATE_VALUES[self.breaker.state])
            yield state
            opened = CounterMetricFamily(
                "cacheproxy_l2_breaker_opened", "Times the L2 circuit breaker opened"
            )
            opened.add_metric([], self.breaker.opened)
            yield opened


_STORE_COUNTERS: Final = (
    ("hits", "Lookups that found a live entry"),
    ("misses", "Lookups that found nothing live"),
    ("sets", "Entries written"),
    ("deletes", "Entries removed by purge, clear or delete"),
    ("evictions", "Entries evicted to stay within bounds"),
    ("expirations", "Entries dropped because they expired"),
    ("errors", "Store calls that failed (refused, timed out)"),
    ("corrupt", "Stored values that did not decode (dropped, served as misses)"),
)


class _QuotaCollector(Collector):
    """Each upstream's quota windows, their limits and the calls counted, at scrape time."""

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[tuple[str, str, float, int]]] | None = None
        self.standing: Callable[[], Iterable[tuple[str, Standing]]] | None = None
        self.live: Callable[[], int] | None = None

    def collect(self) -> Iterator[Metric]:
        labels = ["upstream", "window"]
        limit = GaugeMetricFamily(
            "cacheproxy_upstream_quota_limit", "Calls an upstream's quota window allows",
            labels=labels,
        )  # fmt: skip
        used = GaugeMetricFamily(
            "cacheproxy_upstream_quota_used",
            "Calls counted in an upstream's quota window (fleet-wide when shared)", labels=labels,
        )  # fmt: skip
        for upstream, window, allowed, counted in self.source() if self.source else ():
            limit.add_metric([upstream, window], allowed)
            used.add_metric([upstream, window], counted)
        yield limit
        yield used
        alone = GaugeMetricFamily(
            "cacheproxy_upstream_quota_alone",
            "1 while an upstream's shared quota is counted by this instance alone, in its share"
            " (Redis unreachable)", labels=["upstream"],
        )  # fmt: skip
        for upstream, standing in self.standing() if self.standing else ():
            alone.add_metric([upstream], 0 if standing.shared else 1)
        yield alone
        if self.live is not None:
            live = GaugeMetricFamily(
                "cacheproxy_fleet_instances",
                "Live instances this one knows of, itself included (quota shares divide by it)",
            )
            live.add_metric([], self.live())
            yield live


class _Buckets:
    """A lock-free histogram: one count per bucket (non-cumulative) and the sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(_LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: the first bound >= seconds, i.e. Prometheus' `le` bucket.
        self.counts[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds


class _RequestCollector(Collector):
    """Exports the request tallies as cacheproxy_requests_total and a latency histogram."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "cacheproxy_requests", "Client requests by route and outcome",
            labels=["route", "outcome"],
        )  # fmt: skip
        for (route, outcome), count in sorted(self.metrics.by_route.items()):
            requests.add_metric([route, outcome], count)
        yield requests
        latency = HistogramMetricFamily(
            "cacheproxy_request_duration_seconds", "Time to answer a client request",
            labels=["route"],
        )  # fmt: skip
        for route, buckets in sorted(self.metrics.latency.items()):
            cumulative = list(accumulate(buckets.counts))
            bounds = [*(repr(float(b)) for b in _LATENCY_BUCKETS), "+Inf"]
            latency.add_metric(
                [route], list(zip(bounds, cumulative, strict=True)), sum_value=buckets.total
            )
        yield latency


class Metrics:
    """Every metric the proxy exports, on a registry the app owns."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.upstream_requests = Counter(
            "cacheproxy_upstream_requests", "Requests sent upstream, by status class",
            ["upstream", "status"], registry=r,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "cacheproxy_upstream_errors", "Upstream calls that failed, by kind",
            ["upstream", "kind"], registry=r,
        )  # fmt: skip
        self.upstream_seconds = Histogram(
            "cacheproxy_upstream_duration_seconds", "Time to upstream response headers",
            ["upstream"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.purges = Counter("cacheproxy_purges", "Purge requests by kind", ["kind"], registry=r)
        self.purged_entries = Counter(
            "cacheproxy_purged_entries", "Entries removed by purges", ["kind"], registry=r
        )
        # Per-request series are plain tallies, exported at scrape time by _RequestCollector:
        # prometheus-client takes a lock per inc/observe, a cost the L1 hit path should not pay.
        self.by_route: Tally[tuple[str, str]] = Tally()
        self.latency: dict[str, _Buckets] = {}
        self.upstream_calls: Tally[str] = Tally()
        r.register(_RequestCollector(self))
        self._stores = _StoreCollector()
        r.register(self._stores)
        self._quotas = _QuotaCollector()
        r.register(self._quotas)

    def watch_store(self, layer: str, store: _Observable) -> None:
        """Export a store's size and counters under layer=<layer>."""
        self._stores.stores[layer] = store

    def watch_breaker(self, breaker: CircuitBreaker) -> None:
        """Export the L2 circuit breaker's state."""
        self._stores.breaker = breaker

    def watch_quotas(self, source: Callable[[], Iterable[tuple[str, str, float, int]]]) -> None:
        """Export upstream quotas: `source` yields (upstream, window, limit, used)."""
        self._quotas.source = source

    def watch_fleet(
        self, standing: Callable[[], Iterable[tuple[str, Standing]]], live: Callable[[], int]
    ) -> None:
        """Export whether each shared quota is counted alone, and the live instances."""
        self._quotas.standing = standing
        self._quotas.live = live

    def request(self, route: str, outcome: str, seconds: float) -> None:
        """Count one answered client request."""
        self.by_route[(route, outcome)] += 1
        buckets = self.latency.get(route)
        if buckets is None:
            buckets = self.latency[route] = _Buckets()
        buckets.observe(seconds)

    def upstream_call(self, upstream: str, status: int, seconds: float) -> None:
        """Count one upstream response (headers received)."""
        self.upstream_requests.labels(upstream, f"{status // 100}xx").inc()
        self.upstream_seconds.labels(upstream).observe(seconds)
        self.upstream_calls[upstream] += 1

    def upstream_error(self, upstream: str, kind: str, answered: bool = False) -> None:
        """Count one failed upstream call (timeout, connect, protocol)."""
        self.upstream_errors.labels(upstream, kind).inc()
        if not answered:  # a call that got headers was counted by upstream_call already
            self.upstream_calls[upstream] += 1

    def summary(self) -> dict[str, object]:
        """Hit ratio overall and per route, requests, upstream calls, calls saved."""
        routes: dict[str, dict[str, int]] = {}
        for (route, outcome), count in self.by_route.items():
            routes.setdefault(route, {})[outcome] = count
        per_route = {name: _ratios(outcomes) for name, outcomes in sorted(routes.items())}
        total: Tally[str] = Tally()
        for outcomes in routes.values():
            total.update(outcomes)
        return {
            **_ratios(dict(total)),
            "upstream_calls": dict(self.upstream_calls),
            "upstream_calls_total": sum(self.upstream_calls.values()),
            "routes": per_route,
        }


def _ratios(outcomes: dict[str, int]) -> dict[str, object]:
    lookups = sum(n for o, n in outcomes.items() if o in CACHEABLE_OUTCOMES)
    saved = sum(n for o, n in outcomes.items() if o in SAVED_OUTCOMES)
    return {
        "requests": sum(outcomes.values()),
        "outcomes": {o: outcomes.get(o, 0) for o in OUTCOMES},
        "cacheable_requests": lookups,
        "calls_saved": saved,
        "hit_ratio": round(saved / lookups, 4) if lookups else 0.0,
    }
