"""SIGTERM on a real `python -m proxy serve`: listeners close at once, requests in flight finish
within server.shutdown_grace, L2 writes land whole, and the process exits 0."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import (
    CountingUpstream,
    RedisServer,
    Reply,
    base_config,
    layered_cache,
    spawn_serve,
)

from proxy.config import parse_config
from proxy.entry import decode
from proxy.errors import ConfigError

pytestmark = pytest.mark.slow
N = 12  # requests in flight when the signal arrives


@dataclass
class Served:
    """A `cacheproxy serve` subprocess and where it listens."""

    process: asyncio.subprocess.Process
    port: int
    admin_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.log.read_text()


async def _connects(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except (ConnectionRefusedError, ConnectionResetError):  # reset: the listener closed mid-way
        return False
    writer.close()
    with suppress(OSError):
        await writer.wait_closed()
    return True


async def _until(condition: Any, seconds: float = 10.0) -> None:
    """Wait (bounded) for the other process to do something; condition is async."""
    for _ in range(int(seconds / 0.02)):
        if await condition():
            return
        await asyncio.sleep(0.02)  # waiting for another process, not for time to pass
    raise AssertionError("condition not met in time")


@asynccontextmanager
async def serving(data: dict[str, Any], directory: Path) -> AsyncIterator[Served]:
    """`python -m proxy serve -c <yaml>` on free ports, with no CACHE_* overrides."""
    started = await spawn_serve(data, directory)
    process, port, admin_port = started.process, started.port, started.admin_port
    served = Served(process, port, admin_port, started.log)
    try:
        await _until(lambda: _connects(port))
        await _until(lambda: _connects(admin_port))
        yield served
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _exit_code(served: Served, seconds: float = 20.0) -> int:
    return await asyncio.wait_for(served.process.wait(), seconds)


async def _refused_while_alive(served: Served) -> None:
    """Both listeners stop accepting, while the process is still there finishing work."""
    await _until(lambda: _refusing(served.port))
    await _until(lambda: _refusing(served.admin_port))
    assert served.process.returncode is None


async def _refusing(port: int) -> bool:
    return not await _connects(port)


async def _l2_entries(url: str, prefix: str) -> dict[str, bytes]:
    """Every entry L2 holds under prefix, raw: key -> value."""
    client = aioredis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}e:*")]
        values = await client.mget(keys) if keys else []
    finally:
        await client.aclose()
    return {k.decode(): v for k, v in zip(keys, values, strict=True) if v is not None}


def _body(i: int) -> bytes:
    """A distinct, sizeable body: a truncated copy could not pass for the whole one."""
    return (f'{{"symbol": "S{i}", "points": [' + ",".join(str(i * 7 + j) for j in range(150_000))
            + "]}").encode()  # fmt: skip


def _no_tracebacks(served: Served) -> None:
    text = served.stderr()
    assert "Traceback" not in text, text
    assert "Task was destroyed" not in text, text


async def test_sigterm_finishes_requests_in_flight_and_their_l2_writes(
    upstream: CountingUpstream, redis_proc: RedisServer, tmp_path: Path
) -> None:
    prefix = "shut:"
    for i in range(N):
        upstream.replies[f"/v8/finance/chart/S{i}"] = Reply(body=_body(i))
    upstream.gate = asyncio.Event()
    # L2 calls wait out a pause rather than fail, so the writes are still pending when the
    # listeners are done and must be flushed.
    cache = layered_cache(redis_proc.url, prefix, command_timeout="30s")
    data = base_config(upstream.url, cache=cache)
    async with serving(data, tmp_path) as served, aiohttp.ClientSession() as session:

        async def get(i: int) -> tuple[int, bytes]:
            async with session.get(f"{served.url}/v8/finance/chart/S{i}") as r:
                return r.status, await r.read()

        in_flight = [asyncio.ensure_future(get(i)) for i in range(N)]
        await _until(lambda: _true(upstream.in_flight == N))
        served.process.send_signal(signal.SIGTERM)
        await _refused_while_alive(served)
        assert not any(task.done() for task in in_flight)
        # Redis reads the L2 writes these requests make but holds them: a writer that gave up
        # and hung up now would lose them (the server drops a paused client's command).
        admin = aioredis.from_url(redis_proc.url)
        await admin.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")
        try:
            upstream.gate.set()
            answers = await asyncio.wait_for(asyncio.gather(*in_flight), 20)
            # The requests are done and the listeners closed; the L2 writes are still waiting.
            await _until(lambda: _true("listeners shut down" in served.stderr()))
        finally:
            await admin.execute_command("CLIENT", "UNPAUSE")
            await admin.aclose()
        assert await _exit_code(served) == 0
    assert answers == [(200, _body(i)) for i in range(N)]
    assert upstream.total == N
    entries = await _l2_entries(redis_proc.url, prefix)
    assert sorted(entries) == sorted(f"{prefix}e:GET api /v8/finance/chart/S{i}" for i in range(N))
    for key, raw in entries.items():
        entry = decode(raw)  # raises CorruptEntry on anything half-written
        i = int(key.rsplit("S", 1)[1])
        assert (entry.status, entry.body, entry.route) == (200, _body(i), "chart")
    _no_tracebacks(served)


async def _true(value: bool) -> bool:
    return value


class StallingUpstream:
    """Sends the headers and half of a body, then stalls until the test ends."""

    def __init__(self) -> None:
        self.stalled = 0
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = _body(int(request.path.rsplit("S", 1)[1]))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        self.stalled += 1
        await self.release.wait()
        await response.write(body[len(body) // 2 :])
        return response


@pytest.fixture
async def stalling() -> AsyncIterator[tuple[StallingUpstream, str]]:
    up = StallingUpstream()
    app = web.Application()
    app.router.add_get("/{tail:.*}", up.handle)
    server = TestServer(app)
    await server.start_server()
    yield up, str(server.make_url(""))
    up.release.set()
    await server.close()


async def _cut_requests(
    served: Served, session: aiohttp.ClientSession, up: StallingUpstream, n: int
) -> list[asyncio.Future[int]]:
    async def get(i: int) -> int:
        async with session.get(f"{served.url}/v8/finance/chart/S{i}") as r:
            await r.read()
            return r.status

    in_flight = [asyncio.ensure_future(get(i)) for i in range(n)]
    await _until(lambda: _true(up.stalled == n))
    return in_flight


async def test_past_the_grace_period_requests_are_cut_and_nothing_half_written_is_stored(
    stalling: tuple[StallingUpstream, str], redis_proc: RedisServer, tmp_path: Path
) -> None:
    up, url = stalling
    prefix = "cut:"
    data = base_config(url, cache=layered_cache(redis_proc.url, prefix),
                       server={"shutdown_grace": "1s"})  # fmt: skip
    data["upstreams"]["api"]["timeout"] = "60s"  # the grace must be what ends them
    async with serving(data, tmp_path) as served, aiohttp.ClientSession() as session:
        in_flight = await _cut_requests(served, session, up, N)
        served.process.send_signal(signal.SIGTERM)
        await _refused_while_alive(served)
        # The default grace (10 s) or aiohttp's own (60 s, twice) would not end in time.
        assert await _exit_code(served, seconds=8) == 0
        results = await asyncio.gather(*in_flight, return_exceptions=True)
    assert all(isinstance(r, aiohttp.ClientError) for r in results), results
    assert await _l2_entries(redis_proc.url, prefix) == {}
    _no_tracebacks(served)


async def test_a_second_signal_cuts_the_grace_short(
    stalling: tuple[StallingUpstream, str], tmp_path: Path
) -> None:
    up, url = stalling
    data = base_config(url, server={"shutdown_grace": "5m"})
    data["upstreams"]["api"]["timeout"] = "60s"
    async with serving(data, tmp_path) as served, aiohttp.ClientSession() as session:
        in_flight = await _cut_requests(served, session, up, 3)
        served.process.send_signal(signal.SIGTERM)
        await _refused_while_alive(served)
        served.process.send_signal(signal.SIGINT)
        assert await _exit_code(served) == 0
        results = await asyncio.gather(*in_flight, return_exceptions=True)
    assert all(isinstance(r, aiohttp.ClientError) for r in results), results
    _no_tracebacks(served)


async def test_idle_keep_alive_connections_do_not_hold_the_exit(
    upstream: CountingUpstream, tmp_path: Path
) -> None:
    data = base_config(upstream.url, server={"shutdown_grace": "5m"})
    # The client keeps its idle connections longer than the test waits.
    connector = aiohttp.TCPConnector(keepalive_timeout=120)
    async with serving(data, tmp_path) as served, aiohttp.ClientSession(connector=connector) as s:
        for base, path in ((served.url, "/quote/AAPL"), (f"http://127.0.0.1:{served.admin_port}",
                                                         "/stats")):  # fmt: skip
            async with s.get(base + path) as r:
                assert r.status == 200
        # Both connections are idle in the client's pool, still open.
        served.process.send_signal(signal.SIGTERM)
        assert await _exit_code(served) == 0
    _no_tracebacks(served)


def test_shutdown_grace_is_a_duration_with_a_default() -> None:
    base = base_config("http://127.0.0.1:9")
    assert parse_config(base, env={}).server.shutdown_grace == 10.0
    grace = parse_config({**base, "server": {"shutdown_grace": "30s"}}, env={})
    assert grace.server.shutdown_grace == 30.0
    with pytest.raises(ConfigError, match=r"server\.shutdown_grace"):
        parse_config({**base, "server": {"shutdown_grace": "soon"}}, env={})
