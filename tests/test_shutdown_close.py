"""During a graceful shutdown, responses say Connection: close, so a keep-alive client does
not send another request on a connection that closes once the response is out (that request
would get no answer at all)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from conftest import CountingUpstream, base_config
from test_shutdown import _until, serving


async def _true(value: bool) -> bool:
    return value


async def test_responses_finished_during_the_drain_say_connection_close(
    upstream: CountingUpstream, tmp_path: Path
) -> None:
    upstream.gate = asyncio.Event()
    async with serving(base_config(upstream.url), tmp_path) as served:
        connections = []
        for path in ("/quote/AAPL", "/xhr/ncp"):  # a cached miss (raw bytes), a pass-through
            reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
            method = "POST" if path == "/xhr/ncp" else "GET"
            writer.write(
                f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()
            )
            connections.append((reader, writer))
        await _until(lambda: _true(upstream.in_flight == 2))
        served.process.send_signal(signal.SIGTERM)
        await _until(lambda: _true("shutting down: listeners closed" in served.stderr()))
        upstream.gate.set()
        for reader, writer in connections:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            assert b"\r\nConnection: close\r\n" in head
            writer.close()
        assert await asyncio.wait_for(served.process.wait(), 20) == 0
