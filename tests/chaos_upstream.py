"""A raw HTTP/1.1 upstream for the chaos tests, whose fault can be switched while it serves.

Raw asyncio streams rather than aiohttp, because the faults are exactly what aiohttp's server
will not do: a Content-Length that does not match the body, a reset in the middle of a body,
a listener that goes away. Every 200 body is self-verifying JSON (its own sha256 and the path
it answers), all of one size, so a truncated or mixed-up body is caught wherever it shows up.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import struct
from collections import Counter

BODY_SIZE = 2048
MODES = (
    "healthy",
    "slow",  # headers late, or half the body and then a stall: past the proxy's timeout
    "refuse",  # not listening: connections refused
    "reset",  # half the body, then a TCP reset
    "truncate",  # Content-Length of the whole body, half of it sent, then the connection closes
    "long_length",  # Content-Length 100 more than the body, connection kept open
    "short_length",  # Content-Length 100 less than the body, the whole body sent
    "storm429",  # 429 with Retry-After: 1
)


def make_body(path: str, n: int) -> bytes:
    """A JSON body of exactly BODY_SIZE bytes carrying its path and its own sha256."""
    payload = {"path": path, "n": n, "pad": ""}
    bare = len(json.dumps({**payload, "sha256": "0" * 64}, separators=(",", ":")))
    payload["pad"] = "x" * (BODY_SIZE - bare)
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    body = json.dumps({**payload, "sha256": digest}, separators=(",", ":")).encode()
    assert len(body) == BODY_SIZE
    return body


def body_problem(body: bytes, path: str) -> str | None:
    """Why this is not a whole, intact body for `path` (None when it is)."""
    if len(body) != BODY_SIZE:
        return f"{len(body)} bytes, not {BODY_SIZE}"
    try:
        data = json.loads(body)
        digest = data.pop("sha256")
    except (ValueError, KeyError, TypeError, AttributeError):
        return "not the upstream's JSON"
    if hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest() != digest:
        return "sha256 does not match"
    if data.get("path") != path:
        return f"body for {data.get('path')!r}, not {path!r}"
    return None


class ChaosUpstream:
    """Serves GETs on 127.0.0.1:`port`; `mode` (one of MODES) decides how it answers."""

    def __init__(self, idle: float = 1.0, stall: float = 3.0) -> None:
        self.idle = idle  # idle keep-alive connections are closed after this
        self.stall = stall  # how long "slow" and "long_length" keep a client waiting
        self.port = 0
        self.calls: Counter[str] = Counter()  # requests answered, by mode
        self._mode = "healthy"
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._n = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def mode(self) -> str:
        return self._mode

    async def set_mode(self, mode: str) -> None:
        """Switch faults; "refuse" stops listening and drops every connection."""
        assert mode in MODES, mode
        if mode == "refuse" and self._server is not None:
            await self._stop_listening()
        elif mode != "refuse" and self._server is None:
            await self.start()
        self._mode = mode

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, reuse_address=True, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop_listening(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def close(self) -> None:
        if self._server is not None:
            await self._stop_listening()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            while True:
                try:
                    async with asyncio.timeout(self.idle):
                        head = await reader.readuntil(b"\r\n\r\n")
                except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode("latin-1")
                if not await self._answer(target.split("?", 1)[0], writer):
                    return
        except (ConnectionError, OSError):
            return
        finally:
            self._writers.discard(writer)
            self._handlers.discard(task)
            writer.transport.abort()

    async def _answer(self, path: str, writer: asyncio.StreamWriter) -> bool:
        """Answer one request in the current mode; False when the connection must go."""
        mode = self._mode
        self.calls[mode] += 1
        self._n += 1
        body = make_body(path, self._n)
        half = len(body) // 2

        def head(status: str, length: int, extra: str = "") -> bytes:
            return (
                f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}"
                f"Content-Length: {length}\r\n\r\n"
            ).encode()

        if mode == "slow":
            if self._n % 2:
                await asyncio.sleep(self.stall)  # the upstream behaving slowly, not a test wait
                writer.write(head("200 OK", len(body)) + body)
            else:
                writer.write(head("200 OK", len(body)) + body[:half])
                await writer.drain()
                await asyncio.sleep(self.stall)
                writer.write(body[half:])
        elif mode == "reset":
            writer.write(head("200 OK", len(body)) + body[:half])
            await writer.drain()
            await asyncio.sleep(0.01)  # let the half body leave before the reset
            sock = writer.get_extra_info("socket")
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        elif mode == "truncate":
            writer.write(head("200 OK", len(body)) + body[:half])
            await writer.drain()
            writer.close()
            return False
        elif mode == "long_length":
            writer.write(head("200 OK", len(body) + 100) + body)
            await writer.drain()
            await asyncio.sleep(self.stall)
            return False
        elif mode == "short_length":
            writer.write(head("200 OK", len(body) - 100) + body)
        elif mode == "storm429":
            error = b'{"error": "rate limited"}'
            writer.write(head("429 Too Many Requests", len(error), "Retry-After: 1\r\n") + error)
        else:
            writer.write(head("200 OK", len(body)) + body)
        await writer.drain()
        return True
