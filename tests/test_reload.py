"""Hot reload: POST /reload and SIGHUP switch configs without dropping anything."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from conftest import CountingUpstream, Proxy, ProxyFactory, Reply, base_config
from test_demo import serving


def write(path: Path, data: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(data))


async def with_file(make_proxy: ProxyFactory, data: dict[str, Any], path: Path) -> Proxy:
    write(path, data)
    proxy = await make_proxy(**{k: v for k, v in data.items() if k != "upstreams"})
    proxy.deps.config_path = path
    return proxy


async def test_a_broken_file_is_rejected_and_the_old_routes_keep_serving(
    make_proxy: ProxyFactory, upstream: CountingUpstream, tmp_path: Path
) -> None:
    path = tmp_path / "proxy.yaml"
    proxy = await with_file(make_proxy, base_config(upstream.url), path)
    broken = base_config(upstream.url)
    broken["routes"][0]["ttl_class"] = "newz"
    write(path, broken)
    answer = await proxy.admin.post("/reload")
    assert answer.status == 400
    assert "routes[0].ttl_class: unknown class 'newz'" in (await answer.json())["detail"]
    path.write_text("routes: [unclosed")
    assert (await proxy.admin.post("/reload")).status == 400
    assert (await proxy.client.get("/v8/finance/chart/AAPL")).status == 200
    assert proxy.config.routes.routes[0].ttl_class.name == "short"  # type: ignore[union-attr]


async def test_a_new_ttl_class_takes_effect_without_dropping_requests(
    make_proxy: ProxyFactory, upstream: CountingUpstream, tmp_path: Path
) -> None:
    path = tmp_path / "proxy.yaml"
    data = base_config(upstream.url)
    proxy = await with_file(make_proxy, data, path)
    async with aiohttp.ClientSession(
        str(proxy.client.make_url("")), connector=aiohttp.TCPConnector(limit=1)
    ) as session:
        async with session.get("/v8/finance/chart/A") as r:
            assert "ttl=60" not in r.headers["Cache-Status"]  # a miss
        upstream.gate = asyncio.Event()
        upstream.arrived.clear()
        in_flight = asyncio.ensure_future(proxy.client.get("/v8/finance/chart/SLOW"))
        await asyncio.wait_for(upstream.arrived.wait(), 5)  # the request is at the upstream
        data["ttl_classes"]["brief"] = {"ttl": 5}
        data["routes"][0]["ttl_class"] = "brief"
        write(path, data)
        answer = await proxy.admin.post("/reload")
        assert answer.status == 200
        assert (await answer.json())["restart_needed"] == []
        upstream.gate.set()
        assert (await in_flight).status == 200  # not cut by the reload
        async with session.get("/v8/finance/chart/B") as r:  # the same kept-alive connection
            assert r.status == 200
        async with session.get("/v8/finance/chart/B") as r:
            assert r.headers["Cache-Status"].startswith("cacheproxy; hit; ttl=5;")
    assert len(proxy.l1) == 3  # entries from before the reload are still there


async def test_upstream_changes_switch_sessions_and_pinned_fields_need_a_restart(
    make_proxy: ProxyFactory, upstream: CountingUpstream, tmp_path: Path
) -> None:
    path = tmp_path / "proxy.yaml"
    data = base_config("http://127.0.0.1:9")  # nothing listens there
    proxy = await with_file(make_proxy, data, path)
    data["upstreams"]["api"]["url"] = upstream.url
    data["cache"] = {"backend": "layered", "l1": {"max_entries": 5}}
    write(path, data)
    answer = await (await proxy.admin.post("/reload")).json()
    assert answer["restart_needed"] == ["cache.backend", "cache.l1.max_entries"]
    assert proxy.config.cache.backend == "memory"  # still what is running
    assert (await proxy.client.get("/quote/AAPL")).status == 200  # via the new URL
    assert upstream.total == 1


async def test_reload_needs_the_token(
    make_proxy: ProxyFactory, upstream: CountingUpstream, tmp_path: Path
) -> None:
    path = tmp_path / "proxy.yaml"
    proxy = await with_file(
        make_proxy, base_config(upstream.url, server={"admin_token": "t"}), path
    )
    assert (await proxy.admin.post("/reload")).status == 401
    ok = await proxy.admin.post("/reload", headers={"Authorization": "Bearer t"})
    assert ok.status == 200


async def test_sighup_reloads_a_running_server(upstream: CountingUpstream, tmp_path: Path) -> None:
    async with serving(upstream.url, tmp_path, {"CACHE_BACKEND": ""}) as (process, proxy, _):
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{proxy}/new/route") as r:
                assert r.status == 404
            path = tmp_path / "proxy.yaml"
            data = yaml.safe_load(path.read_text())
            data["routes"].append(
                {"name": "new", "path": "/new/route", "upstream": "api", "ttl_class": "short"}
            )
            write(path, data)
            process.send_signal(signal.SIGHUP)
            for _ in range(200):
                async with session.get(f"{proxy}/new/route") as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.02)  # the signal is handled asynchronously
            else:
                raise AssertionError("SIGHUP did not reload")
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0


async def test_a_reload_cannot_drop_the_token_of_a_public_admin_port(
    make_proxy: ProxyFactory, upstream: CountingUpstream, tmp_path: Path
) -> None:
    path = tmp_path / "proxy.yaml"
    data = base_config(upstream.url, server={"admin_host": "0.0.0.0", "admin_token": "t"})
    proxy = await with_file(make_proxy, data, path)
    data["server"] = {"admin_host": "127.0.0.1"}  # ready for a restart, but not restarted
    write(path, data)
    answer = await proxy.admin.post("/reload", headers={"Authorization": "Bearer t"})
    assert answer.status == 400
    assert "admin_token" in (await answer.json())["detail"]
    assert (await proxy.admin.post("/clear")).status == 401  # still guarded


async def test_requests_resolved_before_a_reload_finish_on_a_removed_upstream(
    make_proxy: ProxyFactory, upstream: CountingUpstream, tmp_path: Path
) -> None:
    path = tmp_path / "proxy.yaml"
    data = base_config(upstream.url)
    proxy = await with_file(make_proxy, data, path)
    upstream.replies["/quote/C"] = Reply(headers={"Set-Cookie": "s=1"})  # waiters refetch
    upstream.gate = asyncio.Event()
    upstream.arrived.clear()
    leader = asyncio.ensure_future(proxy.client.get("/quote/C"))
    await asyncio.wait_for(upstream.arrived.wait(), 5)
    waiter = asyncio.ensure_future(proxy.client.get("/quote/C"))
    await asyncio.sleep(0.05)  # let the waiter join the leader's fetch
    renamed = base_config(upstream.url)
    renamed["upstreams"] = {"api2": renamed["upstreams"]["api"]}
    for route in renamed["routes"]:
        route["upstream"] = "api2"
    write(path, renamed)
    assert (await proxy.admin.post("/reload")).status == 200
    upstream.gate.set()
    assert (await leader).status == 200
    assert (await waiter).status == 200  # fetched itself on the removed upstream's session


async def test_a_reload_that_replaces_an_upstreams_guard_keeps_what_it_spent(
    make_proxy: ProxyFactory, upstream: CountingUpstream, tmp_path: Path
) -> None:
    # The guard was rebuilt with a fresh count whenever a quota or breaker setting changed:
    # a reload of `breaker_failures` gave a 3/day upstream three more calls that day.
    path = tmp_path / "proxy.yaml"
    data = base_config(upstream.url)
    data["upstreams"]["api"].update(rate_limit="3/day", rate_limit_wait="0s")
    write(path, data)
    proxy = await make_proxy(**data)
    proxy.deps.config_path = path
    for n in range(3):
        assert (await proxy.client.get(f"/v8/finance/chart/S{n}")).status == 200
    before = proxy.deps.upstreams.guard("api")
    data["upstreams"]["api"].update(breaker_failures=7, rate_limit="3/day, 10/min")
    write(path, data)
    assert (await proxy.admin.post("/reload")).status == 200
    assert proxy.deps.upstreams.guard("api") is not before  # the guard was replaced ...
    refused = await proxy.client.get("/v8/finance/chart/S9")
    assert refused.status == 503  # ... and the day's 3 calls stay spent
    assert upstream.calls["/v8/finance/chart/S9"] == 0
