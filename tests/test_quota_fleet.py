"""Upstream quotas across a fleet: three real `serve` processes on one Redis spend one
budget (issue 13: two instances at 5/s each used to send 10 calls in one second)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import RedisServer, ServeProcess, base_config, layered_cache, spawn_serve

# Calls reserved a period apart reach the upstream that far apart, give or take how long
# each took to travel there (loopback, a loaded test machine): allowed this much.
JITTER = 0.05


class TimingUpstream:
    """A real aiohttp server that records when each call arrived."""

    def __init__(self) -> None:
        self.times: list[float] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.times.append(time.monotonic())
        return web.json_response({"ok": True})

    def busiest_second(self) -> int:
        """The most calls that arrived within any one second (less the jitter)."""
        times = sorted(self.times)
        return max(
            (sum(1 for u in times[i:] if u - t < 1.0 - JITTER) for i, t in enumerate(times)),
            default=0,
        )


@asynccontextmanager
async def fleet(
    redis_url: str, rate: str, wait: str, tmp_path: Path
) -> AsyncIterator[tuple[TimingUpstream, list[ServeProcess]]]:
    """A timing upstream and three `serve` processes on one Redis with this quota on it."""
    counting = TimingUpstream()
    app = web.Application()
    app.router.add_get("/{tail:.*}", counting.handle)
    server = TestServer(app)
    await server.start_server()
    data = base_config(str(server.make_url("")), cache=layered_cache(redis_url))
    data["upstreams"]["api"].update(rate_limit=rate, rate_limit_wait=wait)
    served: list[ServeProcess] = []
    try:
        for i in range(3):
            directory = tmp_path / f"i{i}"
            directory.mkdir()
            served.append(await spawn_serve({**data}, directory))
        yield counting, served
    finally:
        for proc in served:
            proc.process.kill()
            await proc.process.wait()
        await server.close()


async def test_three_instances_on_one_redis_never_exceed_five_calls_a_second(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with (
        fleet(redis_server.url, "5/s", "3s", tmp_path) as (counting, served),
        aiohttp.ClientSession() as session,
    ):
        for proc in served:  # each process up and answering
            for _ in range(500):
                try:
                    async with session.get(f"http://127.0.0.1:{proc.port}/nowhere"):
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.02)  # waiting for a process, not for time
        counting.times.clear()

        async def get(proc: ServeProcess, key: str) -> int:
            url = f"http://127.0.0.1:{proc.port}/v8/finance/chart/{key}"
            async with session.get(url) as response:
                if response.status != 200:
                    assert (await response.json())["error"] == "upstream_rate-limited"
                return response.status

        statuses = await asyncio.gather(
            *(get(proc, f"K{i}-{n}") for i, proc in enumerate(served) for n in range(12))
        )
    assert set(statuses) <= {200, 503}
    assert counting.busiest_second() <= 5, sorted(counting.times)
    # Within the 3 s each may wait: about 5 a second for the fleet, never 5 each.
    assert 10 <= statuses.count(200) == len(counting.times) <= 5 * 4


def test_busiest_second_counts_a_sliding_second() -> None:
    upstream = TimingUpstream()
    upstream.times = [0.0, 0.1, 0.2, 0.3, 0.4, 1.0, 1.1, 1.2, 1.3, 1.4]
    assert upstream.busiest_second() == 5
    upstream.times.append(0.5)
    assert upstream.busiest_second() == 6


async def test_with_redis_killed_each_instance_spends_its_share_and_resumes_after(
    redis_proc: RedisServer, tmp_path: Path
) -> None:
    statuses: list[int] = []
    phases: dict[str, int] = {}
    async with (
        fleet(redis_proc.url, "6/s", "300ms", tmp_path) as (counting, served),
        aiohttp.ClientSession() as session,
    ):

        async def health(proc: ServeProcess) -> dict[str, object]:
            for _ in range(500):
                try:
                    url = f"http://127.0.0.1:{proc.admin_port}/health"
                    async with session.get(url) as response:
                        return dict(await response.json())
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.02)  # waiting for a process, not for time
            raise AssertionError("no /health")

        for proc in served:  # they hear each other's announcements (every 2 s)
            for _ in range(400):
                if (await health(proc)).get("instances") == 3:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"{proc.port} never saw 3 instances")
        counting.times.clear()
        keys = iter(range(1_000_000))
        stop = asyncio.Event()

        async def client(proc: ServeProcess) -> None:
            while not stop.is_set():
                url = f"http://127.0.0.1:{proc.port}/v8/finance/chart/K{next(keys)}"
                async with session.get(url) as response:
                    statuses.append(response.status)
                    if response.status != 200:  # the quota's refusal, never Redis's 5xx
                        assert response.status == 503, response.status
                        body = await response.json()
                        assert body["error"] == "upstream_rate-limited", body
                await asyncio.sleep(0.02)  # a client's pace, not waiting for time

        clients = [asyncio.create_task(client(p)) for p in served for _ in range(3)]
        try:
            await asyncio.sleep(1.5)  # a burst with Redis
            phases["shared"] = len(counting.times)
            marks = [time.monotonic()]
            redis_proc.stop()
            await asyncio.sleep(3.5)  # the burst goes on alone
            for proc in served:
                body = await health(proc)
                assert body["status"] == "degraded", body
                quota = body["upstreams"]["api"]["quota"]  # type: ignore[index]
                assert quota == {"shared": False, "share": "1/3"}, body
            phases["alone"] = len(counting.times) - phases["shared"]
            marks.append(time.monotonic())
            redis_proc.start()  # the same port, empty
            await asyncio.sleep(4.0)  # the burst goes on, shared again
        finally:
            stop.set()
            await asyncio.gather(*clients)
        for proc in served:
            body = await health(proc)
            assert body["upstreams"]["api"]["quota"] == {  # type: ignore[index]
                "shared": True,
                "share": "1/1",
            }, body
            async with session.get(f"http://127.0.0.1:{proc.admin_port}/metrics") as r:
                text = await r.text()
            assert 'cacheproxy_upstream_quota_alone{upstream="api"} 0.0' in text
            assert "cacheproxy_fleet_instances 3.0" in text
    assert set(statuses) <= {200, 503}
    t0 = min(counting.times)
    rel = [round(t - t0, 3) for t in sorted(counting.times)]
    assert counting.busiest_second() <= 6, (rel, [round(m - t0, 3) for m in marks])
    assert phases["shared"] >= 6
    # Alone: at most 2 a second each, after waiting out what the fleet may have held.
    assert 2 <= phases["alone"] <= 3 * 2 * 3, phases
    assert len(counting.times) - sum(phases.values()) >= 6  # shared again
