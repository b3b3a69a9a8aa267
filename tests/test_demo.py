"""The demo and the `serve` command, run for real on free ports."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import yaml
from conftest import CountingUpstream, RedisServer, base_config, wait_listening

from proxy.demo import Workload, demo

ROOT = Path(__file__).resolve().parent.parent


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_block() -> int:
    """A port p with p, p+1 and p+920 free (the demo's proxy, admin and simulator)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 920 < 65535 and all(_free(p) for p in (port, port + 1, port + 920)):
            return port
    raise RuntimeError("no free port block")


async def test_demo_serves_mostly_from_cache() -> None:
    result = await demo(
        seconds=1.5, rate=40, alpha=1.0, port=_free_port_block(),
        config_path=ROOT / "config/proxy.yaml", latency_scale=0, quiet=True,
    )  # fmt: skip
    assert result.requests > 50
    assert result.errors == 0
    assert 0 < result.upstream_calls < result.requests
    assert result.hit_ratio > 0.2


def test_workload_mix_and_busters() -> None:
    workload = Workload(random.Random(3), briefing_ids=[str(i) for i in range(1, 61)])
    urls = [url for _ in range(2000) for url in workload.page_view()]
    busted = sum("_=" in url for url in urls) / len(urls)
    assert 0.15 < busted < 0.25
    charts = sum(url.startswith("/v8/finance/chart/") for url in urls) / len(urls)
    assert 0.15 < charts < 0.3
    symbols = [u.split("/")[4].split("?")[0] for u in urls if u.startswith("/v8/finance/chart/")]
    assert symbols.count("AAPL") > symbols.count("SYM0100") * 10  # Zipf: rank 1 dominates


@asynccontextmanager
async def serving(
    upstream_url: str, directory: Path, env: dict[str, str]
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, str]]:
    """`python -m proxy serve` on free ports; yields the process, proxy and admin base URLs."""
    port = _free_port_block()
    data = base_config(upstream_url, server={"host": "127.0.0.1", "port": port,
                                             "admin_port": port + 1})  # fmt: skip
    path = directory / "proxy.yaml"
    path.write_text(yaml.safe_dump(data))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "-c", str(path),
        env={**os.environ, **env}, cwd=ROOT,
    )  # fmt: skip
    try:
        await wait_listening(port)
        await wait_listening(port + 1)
        yield process, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_serve_proxies_and_exits_cleanly_on_sigterm(
    upstream: CountingUpstream, tmp_path: Path
) -> None:
    async with serving(upstream.url, tmp_path, {"CACHE_BACKEND": ""}) as (process, proxy, admin):
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.get(f"{proxy}/quote/AAPL") as r:
                    assert r.status == 200
            async with session.get(f"{admin}/stats") as r:
                stats = await r.json()
        assert upstream.total == 1
        assert stats["routes"]["quote"]["outcomes"]["hit_l1"] == 2
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0


async def test_serve_runs_the_layered_backend_on_env_overrides(
    upstream: CountingUpstream, redis_proc: RedisServer, tmp_path: Path
) -> None:
    env = {"CACHE_BACKEND": "layered", "CACHE_REDIS_URL": redis_proc.url}
    async with serving(upstream.url, tmp_path, env) as (process, proxy, admin):
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{proxy}/quote/AAPL") as r:
                assert r.status == 200
            async with session.get(f"{admin}/health") as r:
                health = await r.json()
        assert health["status"] == "ok"
        assert health["l2"]["breaker"] == "closed"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
