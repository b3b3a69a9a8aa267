"""Upstream quotas across a fleet: three real `serve` processes on one Redis spend one
budget (issue 13: two instances at 5/s each used to send 10 calls in one second)."""

from __future__ import annotations

import asyncio
import time
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


async def test_three_instances_on_one_redis_never_exceed_five_calls_a_second(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    counting = TimingUpstream()
    app = web.Application()
    app.router.add_get("/{tail:.*}", counting.handle)
    server = TestServer(app)
    await server.start_server()
    data = base_config(str(server.make_url("")), cache=layered_cache(redis_server.url))
    data["upstreams"]["api"].update(rate_limit="5/s", rate_limit_wait="3s")
    served: list[ServeProcess] = []
    try:
        for i in range(3):
            directory = tmp_path / f"i{i}"
            directory.mkdir()
            served.append(await spawn_serve({**data}, directory))
        async with aiohttp.ClientSession() as session:
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
    finally:
        for proc in served:
            proc.process.kill()
            await proc.process.wait()
        await server.close()


def test_busiest_second_counts_a_sliding_second() -> None:
    upstream = TimingUpstream()
    upstream.times = [0.0, 0.1, 0.2, 0.3, 0.4, 1.0, 1.1, 1.2, 1.3, 1.4]
    assert upstream.busiest_second() == 5
    upstream.times.append(0.5)
    assert upstream.busiest_second() == 6
