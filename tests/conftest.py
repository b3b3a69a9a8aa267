"""Shared fixtures: a real aiohttp upstream that counts its calls, and a proxy in front of it."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import DummyCookieJar, web
from aiohttp.test_utils import RawTestServer, TestClient, TestServer

from proxy.admin import make_admin_app
from proxy.bans import Bans
from proxy.breaker import CircuitBreaker
from proxy.clock import Clock, ManualClock, system_clock
from proxy.config import Config, parse_config
from proxy.deps import Deps, build_deps
from proxy.server import ProxyApp
from proxy.store.guarded import Guarded, GuardedShared
from proxy.store.layered import LayeredStore
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore
from proxy.tasks import Tasks

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Reply:
    """What the fake upstream answers for one path."""

    status: int = 200
    body: bytes = b'{"ok": true}'
    headers: dict[str, str] | list[tuple[str, str]] = field(
        default_factory=lambda: {"Content-Type": "application/json"}
    )
    truncate: bool = False  # promise the whole body in Content-Length, send 10 bytes, hang up


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes


class CountingUpstream:
    """A real aiohttp server that records every request it gets."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.seen: list[Seen] = []
        self.replies: dict[str, Reply] = {}
        self.gate: asyncio.Event | None = None  # when set, responses wait for it
        self.not_modified = 0  # 304s answered to conditional requests
        self.arrived = asyncio.Event()  # set whenever a request arrives
        self.in_flight = 0
        self.max_in_flight = 0  # the most requests it was answering at once
        self.server: TestServer | None = None

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url(""))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.calls[request.path] += 1
        self.arrived.set()
        self.seen.append(Seen(request.method, request.path_qs, dict(request.headers), body))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await asyncio.sleep(0)  # let concurrent requests overlap, as real ones do
        finally:
            self.in_flight -= 1
        reply = self.replies.get(request.path, Reply())
        if reply.truncate:
            response = web.StreamResponse(status=reply.status, headers=reply.headers)
            response.content_length = len(reply.body)
            await response.prepare(request)
            await response.write(reply.body[:10])
            assert request.transport is not None
            request.transport.close()
            return response
        etag = dict(reply.headers).get("ETag") if isinstance(reply.headers, dict) else None
        if etag is not None and request.headers.get("If-None-Match") == etag:
            self.not_modified += 1
            return web.Response(status=304, headers={"ETag": etag, "Cache-Control": "max-age=60"})
        if reply.body == b"<echo>":
            return web.Response(body=body or b"(empty)", headers=reply.headers)
        return web.Response(status=reply.status, body=reply.body, headers=reply.headers)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


@pytest.fixture(autouse=True)
def state_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's own XDG_STATE_HOME: a memory-backend proxy keeps its quota counts there
    (server.state_dir's default), never in the home directory nor across tests. Spawned
    `serve` processes inherit it."""
    home = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("XDG_STATE_HOME", str(home))
    return home


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def tasks() -> AsyncIterator[Tasks]:
    t = Tasks()
    yield t
    await t.close()


@pytest.fixture
async def upstream() -> Any:
    up = CountingUpstream()
    server = TestServer(up.app())
    await server.start_server()
    up.server = server
    yield up
    await server.close()


def base_config(upstream_url: str, **overrides: Any) -> dict[str, Any]:
    """A small config pointing every route at the test upstream."""
    data: dict[str, Any] = {
        "upstreams": {"api": {"url": upstream_url, "timeout": "5s"}},
        "ttl_classes": {"short": {"ttl": 60, "negative_ttl": 10}, "long": "1h"},
        "routes": [
            {"name": "chart", "path": "/v8/finance/chart/{symbol}", "upstream": "api",
             "ttl_class": "short"},
            {"name": "quote", "path": "/quote/{symbol}", "upstream": "api", "ttl_class": "long",
             "methods": ["GET", "HEAD", "POST"]},
            {"name": "news", "path": "/xhr/ncp", "methods": ["POST"], "upstream": "api",
             "pass": True},
        ],
    }  # fmt: skip
    data.update(overrides)
    return data


@dataclass
class Proxy:
    """A running proxy: its client, admin client, deps and clock."""

    client: TestClient
    admin: TestClient
    deps: Deps
    clock: ManualClock

    @property
    def config(self) -> Config:
        return self.deps.config

    def l1_keys(self) -> list[str]:
        return [key for key, _ in self.l1.items()]

    @property
    def l1(self) -> MemoryStore:
        assert self.deps.store.l1 is not None
        return self.deps.store.l1


ProxyFactory = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def make_proxy(upstream: CountingUpstream) -> Any:
    clients: list[TestClient] = []
    running = AsyncExitStack()

    async def factory(**overrides: Any) -> Proxy:
        config = parse_config(base_config(upstream.url, **overrides), env={})
        clock = ManualClock()
        deps = build_deps(config, clock=clock, guard_clock=clock, quota_clock=clock)
        app = await running.enter_async_context(ProxyApp(deps).running())
        # No cookie jar: a client that replays Set-Cookie would (rightly) bypass the cache.
        server = RawTestServer(app.handler.handle)
        # The listener's settings (auto_decompress=False, header limits) as `serve` has them:
        # RawTestServer() ignores them, start_server() applies them.
        await server.start_server(**app.server_args())
        client = TestClient(server, cookie_jar=DummyCookieJar())
        admin = TestClient(TestServer(make_admin_app(deps)))
        for c in (client, admin):
            await c.start_server()
            clients.append(c)
        return Proxy(client, admin, deps, clock)

    yield factory
    for c in reversed(clients):
        await c.close()
    await running.aclose()  # the proxies, last started first


@pytest.fixture
async def proxy(make_proxy: ProxyFactory) -> Proxy:
    return await make_proxy()


# --- a real redis-server on a free port ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server process the tests own: they may stop, hang (SIGSTOP) and restart it."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            message = "redis-server is not installed (apt-get install -y redis-server)"
            if os.environ.get("CI"):
                pytest.fail(message)  # in CI a Redis test must run, never skip
            pytest.skip(message)
        self.binary = binary
        self.directory = directory
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)  # waiting for a process to come up, not for time to pass
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        """Kill it (SIGKILL: like a crash; nothing is saved)."""
        if self.process is not None:
            self.resume()
            self.process.kill()
            self.process.wait()
            self.process = None

    def hang(self) -> None:
        """SIGSTOP: connections stay open and nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One redis-server for the session; tests keep apart with their own key prefix."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_proc(tmp_path: Path) -> Any:
    """A redis-server of this test's own, to stop, hang and restart."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def layered_cache(url: str, prefix: str | None = None, **redis: Any) -> dict[str, Any]:
    """A `cache:` section for a layered backend on the given Redis, with its own prefix."""
    redis_section = {"url": url, "key_prefix": prefix or f"t{uuid.uuid4().hex[:8]}:",
                     "command_timeout": "500ms", "breaker_backoff": "50ms",
                     "breaker_max_backoff": "200ms", **redis}  # fmt: skip
    return {"backend": "layered", "redis": redis_section}


def layered_store(
    l1: MemoryStore | None,
    l2: RedisStore | None,
    breaker: CircuitBreaker,
    tasks: Tasks,
    instance: str = "inst",
    clock: Clock = system_clock,
    bans: Bans | None = None,
) -> LayeredStore:
    """A layered store as build_deps makes one: L1, and a Redis L2 (its remote tier and its
    shared store) behind one breaker."""
    if l2 is None:
        return LayeredStore(l1, [], tasks, instance, clock, bans)
    shared, flush = GuardedShared(l2, breaker), l2.config.popularity_flush
    return LayeredStore(l1, [Guarded(l2, breaker)], tasks, instance, clock, bans, shared, flush)


async def eventually(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Wait (bounded) for something another task or process must do."""
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


# --- a real `cacheproxy serve` process --------------------------------------------------


@dataclass
class ServeProcess:
    """`python -m proxy serve` started on free ports; its stderr goes to `log`."""

    process: asyncio.subprocess.Process
    port: int
    admin_port: int
    log: Path


async def spawn_serve(data: dict[str, Any], directory: Path) -> ServeProcess:
    """Write `data` (its server section completed with free ports) as the config and start
    serving it, without CACHE_* overrides from this environment. Does not wait for it."""
    port, admin_port = _free_port(), _free_port()
    data["server"] = {"host": "127.0.0.1", "port": port, "admin_port": admin_port,
                      **data.get("server", {})}  # fmt: skip
    path = directory / "proxy.yaml"
    path.write_text(yaml.safe_dump(data))
    log = directory / "stderr.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHE_")}
    with log.open("wb") as err:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "-c", str(path),
            env=env, cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    return ServeProcess(process, port, admin_port, log)


# --- an upstream whose answer is made from the request ----------------------------------

Answer = Callable[[web.Request, bytes], tuple[bytes, dict[str, str]]]


class Reflecting(CountingUpstream):
    """A CountingUpstream (counts, records, waits at its gate) whose answer is made from the
    request by `answer(request, body) -> (body, headers)`: a page personalised per Cookie, or
    an error page that echoes what it was sent."""

    def __init__(self, answer: Answer) -> None:
        super().__init__()
        self.answer = answer

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await super().handle(request)
        body, headers = self.answer(request, self.seen[-1].body)
        return web.Response(body=body, headers=headers)


@pytest.fixture
async def reflecting() -> AsyncIterator[Callable[[Answer], Awaitable[Reflecting]]]:
    """Starts Reflecting upstreams; point a proxy at one with `upstreams={"api": ...}`."""
    servers: list[TestServer] = []

    async def start(answer: Answer) -> Reflecting:
        up = Reflecting(answer)
        up.server = TestServer(up.app())
        await up.server.start_server(auto_decompress=False)  # bodies as the proxy sent them
        servers.append(up.server)
        return up

    yield start
    for server in servers:
        await server.close()


async def wait_listening(port: int) -> None:
    """Wait (bounded) for a spawned process to listen on a port."""
    for _ in range(500):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.02)  # waiting for a process to come up, not for time to pass
            continue
        writer.close()
        return
    raise AssertionError(f"nothing listens on {port}")
