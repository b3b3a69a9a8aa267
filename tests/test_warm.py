"""Warm start: configured URLs fetched at start, and L1 filled from L2's hottest keys."""

from __future__ import annotations

import pytest
from conftest import CountingUpstream, ProxyFactory, RedisServer, eventually, layered_cache

from proxy.config import parse_config
from proxy.errors import ConfigError


async def test_listed_urls_are_cached_at_start_with_bounded_concurrency(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    urls = [f"/v8/finance/chart/S{i}?range=5d" for i in range(10)] + ["/quote/AAPL"]
    proxy = await make_proxy(warm={"urls": [*urls, "/not/routed"], "concurrency": 3})
    await proxy.deps.tasks.wait()  # the warm-start task
    assert upstream.total == 11
    assert upstream.max_in_flight <= 3
    for url in urls:
        response = await proxy.client.get(url)
        assert response.headers["Cache-Status"].startswith("cacheproxy; hit"), url
    assert upstream.total == 11


async def test_a_new_instance_warms_l1_from_the_hottest_keys_in_l2(
    make_proxy: ProxyFactory, upstream: CountingUpstream, redis_server: RedisServer
) -> None:
    cache = layered_cache(redis_server.url)
    busy = await make_proxy(cache=cache)
    for symbol, hits in (("HOT", 5), ("WARM", 3), ("COLD", 1)):
        for _ in range(hits):
            await busy.client.get(f"/quote/{symbol}")
    await busy.deps.store.flush()
    await busy.deps.store.popularity.flush()
    fresh = await make_proxy(cache=cache, warm={"hottest": 2})
    await eventually(lambda: len(fresh.l1) == 2)
    assert {"GET api /quote/HOT", "GET api /quote/WARM"} == {k for k in ("GET api /quote/HOT",
            "GET api /quote/WARM", "GET api /quote/COLD") if k in fresh.l1}  # fmt: skip
    assert upstream.total == 3  # warming came from L2, not the upstream


@pytest.mark.parametrize(
    ("warm", "path"),
    [
        ({"urls": ["briefings"]}, "warm.urls[0]"),
        ({"concurrency": 0}, "warm.concurrency"),
        ({"url": ["/x"]}, "warm.url"),
    ],
)
def test_warm_config_errors(warm: dict[str, object], path: str) -> None:
    data = {
        "upstreams": {"api": {"url": "http://127.0.0.1:9"}},
        "ttl_classes": {"t": 60},
        "routes": [{"path": "/x", "upstream": "api", "ttl_class": "t"}],
        "warm": warm,
    }
    with pytest.raises(ConfigError) as e:
        parse_config(data, env={})
    assert e.value.path == path
