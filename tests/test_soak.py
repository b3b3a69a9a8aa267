"""Soak: distinct keys as fast as a real `cacheproxy serve` takes them, through a small L1.

Resident memory must stay within the L1 byte bound plus a fixed allowance, file descriptors
must come back to where they were, and nothing may grow in the second half of the run.
SOAK_SECONDS sets the length of the run (default 120; the layered run takes half).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import (
    RedisServer,
    _free_port,
    base_config,
    layered_cache,
    spawn_serve,
    wait_listening,
)

pytestmark = pytest.mark.slow

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "120"))
MAX_ENTRIES = 1000
MAX_MEMORY_MB = 4
CONNECTIONS = 32  # client connections to the proxy
# Resident memory the proxy may hold beyond its L1 bound once warm (the interpreter and its
# libraries are in the idle baseline). Measured (30 s, 73k keys): ~17 MB over L1, of which
# ~13 MB is the hit path's target memo in server.py (16384 resolved targets at ~790 B each for
# URLs this short, by tracemalloc; bounded by count, not counted in L1), the rest connection
# buffers and allocator arenas kept after frees. The allowance: the memo plus 12 MB.
ALLOWANCE_MB = 25
GROWTH_MB = 6  # the most the second half's peak may exceed the first half's


# --- a fixed-body upstream: every path answers 200, bodies of a few sizes ---------------


class FixedUpstream(asyncio.Protocol):
    """HTTP/1.1 keep-alive server on raw asyncio: answers every request head with 200."""

    bodies = (b"x" * 200, b"y" * 2000, b"z" * 16000)  # a quote, a chart, a news page
    answered = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            self.buffer = self.buffer[end + 4 :]  # GETs from the proxy: no request bodies
            body = self.bodies[FixedUpstream.answered % len(self.bodies)]
            FixedUpstream.answered += 1
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )


# --- the proxy process and what it holds ------------------------------------------------


@dataclass
class Sample:
    at: float
    rss_kb: int
    fds: int
    l1_entries: int
    l1_bytes: int
    keys_sent: int


@dataclass
class Soak:
    process: asyncio.subprocess.Process
    port: int
    admin_port: int
    log: Path
    samples: list[Sample] = field(default_factory=list)

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    async def admin(self, session: aiohttp.ClientSession, path: str) -> Any:
        async with session.get(f"http://127.0.0.1:{self.admin_port}{path}") as r:
            assert r.status == 200
            return await r.json()

    async def sample(self, session: aiohttp.ClientSession, keys_sent: int) -> Sample:
        stats = await self.admin(session, "/stats")
        l1 = stats["layers"]["l1"]
        s = Sample(time.monotonic(), self.rss_kb(), self.fds(), l1["entries"], l1["bytes"],
                   keys_sent)  # fmt: skip
        self.samples.append(s)
        return s


async def start_proxy(upstream_url: str, directory: Path, **overrides: Any) -> Soak:
    started = await spawn_serve(base_config(upstream_url, **overrides), directory)
    process, port, admin_port = started.process, started.port, started.admin_port
    try:
        await wait_listening(port)
        await wait_listening(admin_port)
    except AssertionError:
        process.kill()
        raise
    return Soak(process, port, admin_port, started.log)


@pytest.fixture
async def fixed_upstream() -> AsyncIterator[str]:
    port = _free_port()
    FixedUpstream.answered = 0
    server = await asyncio.get_running_loop().create_server(FixedUpstream, "127.0.0.1", port)
    yield f"http://127.0.0.1:{port}"
    server.close()
    await server.wait_closed()


# --- a fast client: raw keep-alive connections, one distinct key per request ------------


class Driver:
    """CONNECTIONS raw HTTP/1.1 keep-alive connections sending distinct chart keys."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.counter = itertools.count()
        self.sent = 0
        self.statuses: dict[int, int] = {}
        self.stop = asyncio.Event()

    async def connection(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            while not self.stop.is_set():
                n = next(self.counter)
                writer.write(b"GET /v8/finance/chart/K%d HTTP/1.1\r\nHost: soak\r\n\r\n" % n)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                self.statuses[status] = self.statuses.get(status, 0) + 1
                self.sent += 1
        finally:
            writer.close()
            await writer.wait_closed()

    async def run(self, seconds: float, on_tick: Any, every: float) -> None:
        """Drive for `seconds`, calling on_tick() every `every` seconds."""
        workers = [asyncio.ensure_future(self.connection()) for _ in range(CONNECTIONS)]
        try:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and not self.stop.is_set():
                done = [w for w in workers if w.done()]
                for w in done:
                    w.result()  # a client error ends the soak with its cause
                await asyncio.sleep(every)  # the soak is about time passing
                await on_tick()
        finally:
            self.stop.set()
            await asyncio.gather(*workers)


def _mb(kb: int) -> float:
    return kb / 1024


@pytest.mark.parametrize("backend", ["memory", "layered"])
async def test_soak_distinct_keys_through_a_small_l1(
    fixed_upstream: str, tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    l1 = {"max_entries": MAX_ENTRIES, "max_memory": f"{MAX_MEMORY_MB}MB"}
    overrides: dict[str, Any] = {"cache": {"backend": "memory", "l1": l1}}
    seconds = SOAK_SECONDS
    if backend == "layered":
        # Every key also goes through L2: a background write, a backplane message and a
        # popularity count each. A 2 s TTL keeps Redis's own memory small; half the run.
        redis: RedisServer = request.getfixturevalue("redis_proc")
        overrides = {"cache": {**layered_cache(redis.url), "l1": l1},
                     "ttl_classes": {"short": {"ttl": 2}, "long": "1h"}}  # fmt: skip
        seconds = SOAK_SECONDS / 2
    soak = await start_proxy(fixed_upstream, tmp_path, **overrides)
    try:
        async with aiohttp.ClientSession() as session:
            # A process just started subscribes to the backplane in the background, and says
            # degraded until it has (under load this took long enough to fail the soak once).
            health = await soak.admin(session, "/health")
            for _ in range(500):
                if health["status"] == "ok":
                    break
                await asyncio.sleep(0.02)
                health = await soak.admin(session, "/health")
            assert health["status"] == "ok", health
            idle = await soak.sample(session, 0)  # the interpreter and its libraries
            driver = Driver(soak.port)
            warm_up = min(20.0, seconds / 4)

            async def tick() -> None:
                s = await soak.sample(session, driver.sent)
                assert s.l1_entries <= MAX_ENTRIES
                assert s.l1_bytes <= MAX_MEMORY_MB * 1024 * 1024

            await driver.run(seconds, tick, every=2.0)
            stats = await soak.admin(session, "/stats")
            # The clients have hung up: each of their connections' descriptors is released.
            # (The upstream pool's idle connections stay: they are reused, not leaked.)
            busiest = max(s.fds for s in soak.samples)
            for _ in range(250):
                after = soak.fds()
                if after <= busiest - CONNECTIONS:
                    break
                await asyncio.sleep(0.02)  # waiting for the other process to notice closes
        soak.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(soak.process.wait(), 30) == 0
    finally:
        if soak.process.returncode is None:
            soak.process.kill()
            await soak.process.wait()

    started = soak.samples[1].at if len(soak.samples) > 1 else idle.at
    warm = [s for s in soak.samples[1:] if s.at - started >= warm_up]
    half = len(warm) // 2
    first, second = warm[:half], warm[half:]
    peak = max(s.rss_kb for s in warm)
    report = (
        f"soak {backend} {seconds:.0f}s: {driver.sent} distinct keys "
        f"({driver.sent / seconds:.0f}/s), statuses {driver.statuses}, "
        f"upstream answered {FixedUpstream.answered}; RSS idle {_mb(idle.rss_kb):.1f} MB, "
        f"peak {_mb(peak):.1f} MB, first-half peak {_mb(max(s.rss_kb for s in first)):.1f} MB, "
        f"second-half peak {_mb(max(s.rss_kb for s in second)):.1f} MB; fds idle {idle.fds}, "
        f"max {max(s.fds for s in warm)}, after {after}; "
        f"L1 max entries seen {max(s.l1_entries for s in warm)}, "
        f"max bytes seen {max(s.l1_bytes for s in warm)}; "
        f"evictions {stats['layers']['l1'].get('evictions')}"
    )
    print(report)
    (tmp_path / "soak.txt").write_text(report + "\n" + "\n".join(map(str, soak.samples)))
    assert driver.statuses.keys() == {200}, report
    assert driver.sent > 10 * MAX_ENTRIES, report  # the L1 turned over many times
    assert FixedUpstream.answered == driver.sent, report  # every key was a miss
    # Memory: bounded by L1's byte limit plus the allowance, and flat once warm.
    assert _mb(peak - idle.rss_kb) <= MAX_MEMORY_MB + ALLOWANCE_MB, report
    growth = max(s.rss_kb for s in second) - max(s.rss_kb for s in first)
    assert _mb(growth) <= GROWTH_MB, report
    # Descriptors: one per client connection, at most one upstream connection per request in
    # flight, Redis's pool about as many again (the pools fill lazily, so the count may still
    # rise after warm-up, but only to this): a leak of one per thousand keys would exceed it
    # within a minute. And every client connection's descriptor is released.
    assert busiest <= idle.fds + 3 * CONNECTIONS + 8, report
    assert after <= busiest - CONNECTIONS, report
    stderr = soak.log.read_text()
    assert "Traceback" not in stderr, stderr[-4000:]
    assert "Task was destroyed" not in stderr, stderr[-4000:]


async def test_serving_writes_no_log_line_per_request(fixed_upstream: str, tmp_path: Path) -> None:
    """Without server.access_log, a busy proxy's log stays as long as an idle one's: a line per
    request would grow a file without bound (aiohttp's own access log, ~140 B a request)."""
    soak = await start_proxy(fixed_upstream, tmp_path)
    try:
        driver = Driver(soak.port)

        async def tick() -> None:
            if driver.sent >= 500:
                driver.stop.set()

        await driver.run(10, tick, every=0.05)
        soak.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(soak.process.wait(), 30) == 0
    finally:
        if soak.process.returncode is None:
            soak.process.kill()
            await soak.process.wait()
    assert driver.sent >= 500
    lines = soak.log.read_text().splitlines()
    assert len(lines) < 10, lines[:20]
