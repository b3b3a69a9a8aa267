"""Structured access logs: one JSON line per request, never a secret."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import CountingUpstream, ProxyFactory


async def test_one_json_line_per_request_without_secrets(
    make_proxy: ProxyFactory, upstream: CountingUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await make_proxy(
        server={"access_log": True},
        upstreams={"api": {"url": upstream.url, "query": {"apikey": "PROXY-SECRET"}}},
    )
    caplog.set_level("INFO", logger="cacheproxy.access")
    await proxy.client.get("/quote/AAPL?apikey=CLIENT-SECRET&x=1")
    await proxy.client.get("/quote/AAPL?apikey=CLIENT-SECRET&x=1")
    await proxy.client.get("/nowhere")
    lines = [r.getMessage() for r in caplog.records if r.name == "cacheproxy.access"]
    assert len(lines) == 3
    assert all("SECRET" not in line for line in lines)
    miss, hit, unmatched = (json.loads(line) for line in lines)
    assert miss["route"] == "quote" and miss["outcome"] == "miss" and miss["status"] == 200
    assert miss["path"] == "/quote/AAPL" and miss["method"] == "GET"
    assert miss["upstream_ms"] is not None and miss["upstream_ms"] > 0
    assert hit["outcome"] == "hit_l1" and hit["upstream_ms"] is None
    assert hit["key_hash"] == miss["key_hash"]
    [key] = [k async for k, _ in proxy.deps.store.scan()]
    assert miss["key_hash"] == hashlib.sha256(key.encode()).hexdigest()[:16]
    assert unmatched["route"] == "unmatched" and unmatched["status"] == 404
    assert all(line["latency_ms"] >= 0 and line["time"].endswith("Z") for line in (miss, hit))


async def test_access_log_is_off_by_default(
    proxy: object, upstream: CountingUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    from conftest import Proxy

    assert isinstance(proxy, Proxy)
    caplog.set_level("INFO", logger="cacheproxy.access")
    await proxy.client.get("/quote/AAPL")
    assert not [r for r in caplog.records if r.name == "cacheproxy.access"]


async def test_access_lines_go_to_stdout(
    make_proxy: ProxyFactory, upstream: CountingUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    from proxy import accesslog

    saved = list(accesslog.log.handlers), accesslog.log.propagate
    accesslog.log.handlers.clear()
    try:
        accesslog.configure()
        proxy = await make_proxy(server={"access_log": True})
        await proxy.client.get("/quote/AAPL")
        out = capsys.readouterr().out
        assert json.loads(out.strip().splitlines()[-1])["route"] == "quote"
    finally:
        accesslog.log.handlers[:] = saved[0]
        accesslog.log.propagate = saved[1]
