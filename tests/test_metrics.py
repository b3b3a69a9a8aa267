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


async def test_promtool_accepts_the_metrics_of_a_busy_proxy(
    make_proxy: object, upstream: object, redis_server: object
) -> None:
    """`promtool check metrics` finds nothing to complain about (names, types, help, labels)."""
    import asyncio
    import os
    import shutil

    import pytest
    from conftest import CountingUpstream, ProxyFactory, RedisServer, Reply, layered_cache

    assert isinstance(upstream, CountingUpstream) and isinstance(redis_server, RedisServer)
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed (apt-get install -y prometheus)")
        pytest.skip("promtool is not installed (apt-get install -y prometheus)")
    factory: ProxyFactory = make_proxy  # type: ignore[assignment]
    proxy = await factory(cache=layered_cache(redis_server.url))
    upstream.replies["/quote/ERR"] = Reply(status=503, body=b"down")
    for path in ("/quote/AAPL", "/quote/AAPL", "/quote/ERR", "/nowhere", "/xhr/ncp"):
        await proxy.client.get(path)
    await proxy.client.post("/xhr/ncp", data=b"{}")
    await proxy.admin.post("/purge", json={"pattern": "/quote/*"})
    text = await (await proxy.admin.get("/metrics")).read()
    check = await asyncio.create_subprocess_exec(
        promtool, "check", "metrics",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await check.communicate(text)
    assert check.returncode == 0, output.decode()
    assert output.decode().strip() == "", output.decode()  # not even a lint warning
    for family in (
        b"cacheproxy_requests_total", b"cacheproxy_request_duration_seconds_bucket",
        b"cacheproxy_upstream_requests_total", b"cacheproxy_cache_entries",
        b"cacheproxy_l2_breaker_state", b"cacheproxy_purges_total",
    ):  # fmt: skip
        assert family in text
