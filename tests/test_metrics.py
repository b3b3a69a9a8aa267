"""proxy/metrics.py: scrape-time series agree with what was recorded."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import Metrics


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_requests_and_latency_histogram_are_exported() -> None:
    metrics = Metrics()
    for seconds in (0.0002, 0.0004, 0.003, 0.2, 42.0):
        metrics.request("chart", "hit_l1", seconds)
    metrics.request("chart", "miss", 0.05)
    samples = _samples(metrics)
    assert samples[("cacheproxy_requests_total", (("outcome", "hit_l1"), ("route", "chart")))] == 5
    assert samples[("cacheproxy_requests_total", (("outcome", "miss"), ("route", "chart")))] == 1

    def bucket(le: str) -> float:
        return samples[
            ("cacheproxy_request_duration_seconds_bucket", (("le", le), ("route", "chart")))
        ]

    assert bucket("0.0005") == 2
    assert bucket("0.005") == 3
    assert bucket("0.05") == 4  # le is inclusive: 0.05 counts in the 0.05 bucket
    assert bucket("10.0") == 5
    assert bucket("+Inf") == 6
    count = samples[("cacheproxy_request_duration_seconds_count", (("route", "chart"),))]
    total = samples[("cacheproxy_request_duration_seconds_sum", (("route", "chart"),))]
    assert count == 6
    assert abs(total - (0.0002 + 0.0004 + 0.003 + 0.2 + 42.0 + 0.05)) < 1e-9


def test_summary_ratios() -> None:
    metrics = Metrics()
    for outcome, n in (("hit_l1", 6), ("coalesced", 1), ("miss", 3), ("bypass", 5), ("error", 1)):
        for _ in range(n):
            metrics.request("quote", outcome, 0.001)
    summary = metrics.summary()
    assert summary["requests"] == 16
    assert summary["cacheable_requests"] == 10
    assert summary["calls_saved"] == 7
    assert summary["hit_ratio"] == 0.7
