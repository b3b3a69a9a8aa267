"""Faults under load (issue 7 item 1): the proxy as a real process, a few hundred requests per
second, while Redis is killed, hung, restarted or flapping, or the upstream is slow, refuses,
resets, truncates, lies about Content-Length or storms 429s.

For every fault: keys with a stale copy never get a 5xx; keys without one get a clear
502/503/504 with a JSON error (or the upstream's own 429), never a 500; no truncated body is
ever served or stored; afterwards the proxy recovers by itself (fresh fetches stored, L2 and
both breakers back) and its memory, file descriptors and connections return to baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import socket
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from chaos_upstream import ChaosUpstream, body_problem
from conftest import RedisServer
from redis.asyncio import Redis

from proxy.entry import decode
from proxy.keys import CacheKey

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "chaos:"
KNOWN = 40  # keys per route fetched in warm-up: they always have a stale copy
RATE = 300  # requests per second offered
CONCURRENCY = 64  # requests in flight at most
PHASE = 10.0  # seconds of load under each fault
FD_SLACK = 10
RSS_SLACK_KB = 30 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proxy_config(port: int, admin_port: int, upstream_url: str, redis_url: str) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": port, "admin_port": admin_port,
                   "log_level": "warning", "coalesce_timeout": "5s"},
        "upstreams": {"api": {"url": upstream_url, "connect_timeout": "500ms", "timeout": "1s",
                              "max_connections": 100, "breaker_failures": 5,
                              "breaker_backoff": "200ms", "breaker_max_backoff": "1s"}},
        "ttl_classes": {
            # served stale at once while one background refresh runs
            "swr": {"ttl": "1s", "stale_while_revalidate": "10m", "stale_if_error": "1h"},
            # stale only when the upstream fails: every request goes upstream
            "sie": {"ttl": "1s", "stale_if_error": "1h"},
        },
        "routes": [
            {"name": "swr", "path": "/swr/{id}", "upstream": "api", "ttl_class": "swr"},
            {"name": "sie", "path": "/sie/{id}", "upstream": "api", "ttl_class": "sie"},
        ],
        "cache": {"backend": "layered", "l1": {"max_entries": 50000, "max_memory": "500MB"},
                  "redis": {"url": redis_url, "key_prefix": PREFIX, "command_timeout": "200ms",
                            "connect_timeout": "250ms", "breaker_failures": 3,
                            "breaker_backoff": "100ms", "breaker_max_backoff": "1s",
                            "lease_ttl": "5s", "lease_wait": "2s"}},
    }  # fmt: skip


# --- the proxy process, seen from outside ----------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """What the proxy process holds: memory, descriptors, TCP connections by peer."""

    rss_kb: int
    fds: int
    upstream: int  # established connections to the upstream
    redis: int  # established connections to Redis
    inbound: int  # established client connections

    def __str__(self) -> str:
        return (f"rss={self.rss_kb // 1024}MB fds={self.fds} upstream={self.upstream} "
                f"redis={self.redis} inbound={self.inbound}")  # fmt: skip


def snapshot(pid: int, port: int, upstream_port: int, redis_port: int) -> Snapshot:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    inodes = set()
    fds = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        fds += 1
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    peers: Counter[str] = Counter()
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            cols = line.split()
            if cols[9] not in inodes or cols[3] != "01":  # 01: ESTABLISHED
                continue
            local, remote = int(cols[1].split(":")[1], 16), int(cols[2].split(":")[1], 16)
            if remote == upstream_port:
                peers["upstream"] += 1
            elif remote == redis_port:
                peers["redis"] += 1
            elif local == port:
                peers["inbound"] += 1
    return Snapshot(rss, fds, peers["upstream"], peers["redis"], peers["inbound"])


@dataclass
class Tally:
    """What one load run saw."""

    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)  # (kind, status)
    details: Counter[str] = field(default_factory=Counter)  # Cache-Status details seen
    failures: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.failures.append(message)

    def count(self, kind: str, predicate: Callable[[int], bool]) -> int:
        return sum(n for (k, s), n in self.statuses.items() if k == kind and predicate(s))


@dataclass
class Chaos:
    """The proxy process in front of a ChaosUpstream, on a Redis of the test's own."""

    proc: asyncio.subprocess.Process
    port: int
    admin_port: int
    upstream: ChaosUpstream
    redis: RedisServer
    log: Path
    session: aiohttp.ClientSession
    fresh_ids: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def known(self) -> list[str]:
        return [f"/{route}/k{i}" for route in ("swr", "sie") for i in range(KNOWN)]

    def new_path(self) -> str:
        n = next(self.fresh_ids)
        return f"/{'swr' if n % 2 else 'sie'}/n{n}"

    def snapshot(self) -> Snapshot:
        return snapshot(self.proc.pid, self.port, self.upstream.port, self.redis.port)

    async def admin(self, path: str) -> dict[str, Any]:
        async with self.session.get(f"http://127.0.0.1:{self.admin_port}{path}") as r:
            return dict(await r.json())

    async def get(self, path: str, session: aiohttp.ClientSession | None = None) -> Response:
        async with (session or self.session).get(self.base + path) as r:
            return Response(r.status, r.headers.get("Cache-Status", ""), await r.read())

    async def load(self, seconds: float, rate: float = RATE) -> Tally:
        """Offer `rate` requests per second (at most CONCURRENCY in flight) for `seconds`:
        four in five for known keys, one in five for keys never asked for before."""
        tally = Tally()
        known = self.known()
        rng = random.Random(7)
        slots = asyncio.Semaphore(CONCURRENCY)
        tasks: set[asyncio.Task[None]] = set()
        connector = aiohttp.TCPConnector(limit=CONCURRENCY)
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def one(kind: str, path: str) -> None:
                try:
                    response = await self.get(path, session)
                except (aiohttp.ClientError, TimeoutError) as e:
                    tally.fail(f"{path}: {type(e).__name__}: {e}")
                else:
                    check(tally, kind, path, response, self.upstream.mode)
                finally:
                    slots.release()

            started = time.monotonic()
            for i in range(int(seconds * rate)):
                await slots.acquire()
                kind, path = (
                    ("new", self.new_path()) if i % 5 == 4 else ("known", rng.choice(known))
                )
                task = asyncio.create_task(one(kind, path))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                # pacing the offered load, not waiting for anything to happen
                await asyncio.sleep(max(0.0, started + (i + 1) / rate - time.monotonic()))
            await asyncio.gather(*tasks)
        return tally

    async def quiet(self) -> Snapshot:
        """The process once clients and idle upstream connections are gone (bounded wait)."""
        for _ in range(300):
            snap = self.snapshot()
            if snap.inbound == 0 and snap.upstream == 0:
                return snap
            await asyncio.sleep(0.05)
        raise AssertionError(f"connections never closed: {self.snapshot()}")

    def log_problems(self) -> list[str]:
        text = self.log.read_text(errors="replace")
        bad = ("Traceback", " ERROR ", "Error handling", "never retrieved", "Unclosed")
        return [line for line in text.splitlines() if any(b in line for b in bad)]


@dataclass(frozen=True)
class Response:
    status: int
    cache_status: str
    body: bytes


def check(tally: Tally, kind: str, path: str, r: Response, mode: str) -> None:
    """One response against the rules: see the module docstring."""
    tally.statuses[kind, r.status] += 1
    if not r.cache_status:
        tally.fail(f"{path}: {r.status} without Cache-Status")
    if "detail=" in r.cache_status:
        tally.details[r.cache_status.rsplit("detail=", 1)[1]] += 1
    if r.status == 200:
        if (problem := body_problem(r.body, path)) is not None:
            tally.fail(f"{path}: 200 with a broken body ({problem}): {r.cache_status}")
        return
    if kind == "known":
        tally.fail(f"{path} has a stale copy but got {r.status}: {r.cache_status} {r.body[:200]!r}")
        return
    if r.status == 429 and mode == "storm429":
        return  # the upstream's own answer, relayed (and not stored: checked after)
    if r.status not in (502, 503, 504):
        tally.fail(f"{path}: {r.status} is not a clear gateway error: {r.body[:200]!r}")
        return
    try:
        error = json.loads(r.body)["error"]
    except (ValueError, KeyError, TypeError):
        tally.fail(f"{path}: {r.status} without a JSON error: {r.body[:200]!r}")
        return
    if not str(error).startswith("upstream_"):
        tally.fail(f"{path}: {r.status} names no upstream failure: {error}")


async def wait_until(probe: Callable[[], Awaitable[str | None]], seconds: float = 20.0) -> None:
    """Poll `probe` (bounded) until it reports no problem; fail with its last one."""
    problem: str | None = "never probed"
    for _ in range(int(seconds / 0.1)):
        problem = await probe()
        if problem is None:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not recovered: {problem}")


async def stored_problems(redis_url: str) -> tuple[int, list[str]]:
    """Every entry in L2, decoded: how many, and any whose body is not whole."""
    client = Redis.from_url(redis_url)
    problems: list[str] = []
    count = 0
    try:
        async for raw_key in client.scan_iter(match=PREFIX + "e:*", count=500):
            raw = await client.get(raw_key)
            if raw is None:
                continue
            count += 1
            key = raw_key.decode()[len(PREFIX) + 2 :]
            entry = decode(raw)
            path = CacheKey.parse(key).url
            if (problem := body_problem(entry.body, path)) is not None:
                problems.append(f"L2 holds a broken body for {key} ({entry.status}): {problem}")
    finally:
        await client.aclose()
    return count, problems


async def listed_problems(chaos: Chaos) -> list[str]:
    """Entries the admin /keys lists (L1 and L2) with a status or size other than a whole 200."""
    problems: list[str] = []
    sizes: Counter[int] = Counter()
    cursor = ""
    for _ in range(1000):
        page = await chaos.admin(f"/keys?limit=1000{'&cursor=' + cursor if cursor else ''}")
        for item in page["keys"]:
            if item["status"] != 200:
                problems.append(f"stored a {item['status']} for {item['key']}")
            sizes[item["size"]] += 1
        if not (cursor := page.get("next_cursor") or ""):
            break
    if len(sizes) > 1:  # every body is BODY_SIZE bytes and the headers are the same
        problems.append(f"entries of different sizes: {dict(sizes)}")
    return problems


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
async def chaos(redis_proc: RedisServer, tmp_path: Path) -> AsyncIterator[Chaos]:
    upstream = ChaosUpstream()
    await upstream.start()
    port, admin_port = _free_port(), _free_port()
    config = tmp_path / "chaos.yaml"
    config.write_text(yaml.safe_dump(proxy_config(port, admin_port, upstream.url, redis_proc.url)))
    log = tmp_path / "proxy.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "-c", str(config), "--log-level", "warning",
            cwd=ROOT, stdout=out, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    session = aiohttp.ClientSession(  # no keep-alive: the process's connections are counted
        connector=aiohttp.TCPConnector(force_close=True), timeout=aiohttp.ClientTimeout(total=10)
    )
    chaos = Chaos(proc, port, admin_port, upstream, redis_proc, log, session)
    try:

        async def up() -> str | None:
            if proc.returncode is not None:
                raise AssertionError(f"proxy exited: {log.read_text()}")
            try:
                health = await chaos.admin("/health")
            except aiohttp.ClientError as e:
                return str(e)
            return None if health["status"] == "ok" else str(health)

        await wait_until(up, 20)
        yield chaos
    finally:
        await session.close()
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await upstream.close()


# --- the faults ----------------------------------------------------------------------------


async def redis_kill(chaos: Chaos, done: asyncio.Event) -> None:
    chaos.redis.stop()
    await done.wait()
    await asyncio.to_thread(chaos.redis.start)


async def redis_hang(chaos: Chaos, done: asyncio.Event) -> None:
    chaos.redis.hang()
    await done.wait()
    chaos.redis.resume()


async def redis_restart(chaos: Chaos, done: asyncio.Event) -> None:
    """Killed and started again every 3 s (empty each time: nothing is saved)."""
    while not done.is_set():
        chaos.redis.stop()
        await asyncio.to_thread(chaos.redis.start)
        with contextlib.suppress(TimeoutError):  # paces the fault
            await asyncio.wait_for(done.wait(), 3.0)


async def redis_flap(chaos: Chaos, done: asyncio.Event) -> None:
    """Hung and resumed every half second."""
    hung = False
    while not done.is_set():
        (chaos.redis.resume if hung else chaos.redis.hang)()
        hung = not hung
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 0.5)
    chaos.redis.resume()


def upstream_fault(mode: str) -> Callable[[Chaos, asyncio.Event], Awaitable[None]]:
    async def fault(chaos: Chaos, done: asyncio.Event) -> None:
        await chaos.upstream.set_mode(mode)
        await done.wait()
        await chaos.upstream.set_mode("healthy")

    return fault


FAULTS: dict[str, Callable[[Chaos, asyncio.Event], Awaitable[None]]] = {
    "redis-killed": redis_kill,
    "redis-hung": redis_hang,
    "redis-restarted": redis_restart,
    "redis-flapping": redis_flap,
    **{f"upstream-{mode}": upstream_fault(mode) for mode in (
        "slow", "refuse", "reset", "truncate", "long_length", "short_length", "storm429")},
}  # fmt: skip


@pytest.mark.parametrize("name", list(FAULTS))
async def test_fault_under_load(chaos: Chaos, name: str) -> None:
    async with asyncio.timeout(150):
        # Warm-up: every known key stored, and pools grown by a short healthy run.
        for path in chaos.known():
            r = await chaos.get(path)
            assert r.status == 200 and body_problem(r.body, path) is None, (path, r)
        warm = await chaos.load(2.0)
        assert not warm.failures, warm.failures[:10]
        assert not warm.count("new", lambda s: s != 200), warm.statuses
        stats = await chaos.admin("/stats")
        l2_errors = stats["layers"]["l2"]["errors"]
        baseline = await chaos.quiet()

        done = asyncio.Event()
        fault = asyncio.create_task(FAULTS[name](chaos, done))
        try:
            tally = await chaos.load(PHASE)
        finally:
            done.set()
            await fault
        summary = f"{name}: {dict(tally.statuses)} {dict(tally.details)} {chaos.upstream.calls}"
        print(summary)

        # During the fault: stale copies stood in, no 500, no broken body.
        assert not tally.failures, f"{len(tally.failures)} failures: {tally.failures[:10]}"
        assert tally.count("known", lambda s: s == 200) > 0, summary
        if name.startswith("redis"):
            assert not tally.count("new", lambda s: s != 200), summary  # Redis never 5xx
            stats = await chaos.admin("/stats")
            assert stats["layers"]["l2"]["errors"] > l2_errors, "the fault never reached L2"
        else:
            mode = name.removeprefix("upstream-")
            assert mode == "refuse" or chaos.upstream.calls[mode] > 0, chaos.upstream.calls
            # The breaker spared it: the calls in flight when it opened (one per client request
            # in flight, one refresh per swr key), then a few probes a second.
            spared = CONCURRENCY + KNOWN + 3 * PHASE
            assert chaos.upstream.calls[mode] <= spared, chaos.upstream.calls
            assert tally.count("new", lambda s: s != 200) > 0, f"the fault did nothing: {summary}"
            assert tally.details["stale-if-error"] > 0, summary

        # Recovery, with no restart: new keys fetched and stored, L2 and breakers back.
        await recover(chaos)
        count, problems = await stored_problems(chaos.redis.url)
        assert count > 0 and not problems, problems[:10]
        assert not await listed_problems(chaos)

        # Back to baseline: memory, descriptors, connections.
        after = await chaos.quiet()
        print(f"baseline {baseline}\nafter    {after}")
        assert after.fds <= baseline.fds + FD_SLACK, (baseline, after)
        assert after.rss_kb <= baseline.rss_kb + RSS_SLACK_KB, (baseline, after)
        assert after.redis <= baseline.redis + FD_SLACK, (baseline, after)
        assert (await chaos.admin("/health"))["in_flight"] == 0  # no fetch left hanging
        assert chaos.proc.returncode is None
        assert not chaos.log_problems(), chaos.log_problems()[:20]


async def recover(chaos: Chaos) -> None:
    """Wait (bounded) until a never-seen key is fetched, stored in L1 and L2, and served from
    the cache; the L2 and upstream breakers closed; every known key served whole."""
    stats = await chaos.admin("/stats")
    reads = stats["layers"]["l2"]["hits"] + stats["layers"]["l2"]["misses"]

    async def probe() -> str | None:
        path = chaos.new_path()
        r = await chaos.get(path)
        if r.status != 200 or "stored" not in r.cache_status:
            return f"new key {path}: {r.status} {r.cache_status}"
        if (problem := body_problem(r.body, path)) is not None:
            return f"new key {path}: {problem}"
        again = await chaos.get(path)
        if "hit" not in again.cache_status or body_problem(again.body, path) is not None:
            return f"new key {path} not served from the cache: {again.cache_status}"
        health = await chaos.admin("/health")
        if health["status"] != "ok" or health["l2"]["breaker"] != "closed":
            return f"health: {health}"
        if health["upstreams"]["api"]["breaker"] != "closed":
            return f"upstream breaker: {health['upstreams']}"
        stats = await chaos.admin("/stats")
        if stats["layers"]["l2"]["hits"] + stats["layers"]["l2"]["misses"] <= reads:
            return "no L2 read has worked since the fault"
        client = Redis.from_url(chaos.redis.url)
        try:
            if not await client.exists(f"{PREFIX}e:GET api {path}"):
                return f"{path} did not reach L2"
        finally:
            await client.aclose()
        return None

    await wait_until(probe)
    for path in chaos.known():
        r = await chaos.get(path)
        assert r.status == 200 and body_problem(r.body, path) is None, (path, r)
