"""Shared fixtures: a real aiohttp upstream that counts its calls, and a proxy in front of it."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import DummyCookieJar, web
from aiohttp.test_utils import TestClient, TestServer

from proxy.admin import make_admin_app
from proxy.clock import ManualClock
from proxy.config import Config, parse_config
from proxy.deps import Deps, build_deps
from proxy.server import make_proxy_app


@dataclass
class Reply:
    """What the fake upstream answers for one path."""

    status: int = 200
    body: bytes = b'{"ok": true}'
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
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
        self.seen.append(Seen(request.method, request.path_qs, dict(request.headers), body))
        if self.gate is not None:
            await self.gate.wait()
        reply = self.replies.get(request.path, Reply())
        if reply.truncate:
            response = web.StreamResponse(status=reply.status, headers=reply.headers)
            response.content_length = len(reply.body)
            await response.prepare(request)
            await response.write(reply.body[:10])
            assert request.transport is not None
            request.transport.close()
            return response
        if reply.body == b"<echo>":
            return web.Response(body=body or b"(empty)", headers=reply.headers)
        return web.Response(status=reply.status, body=reply.body, headers=reply.headers)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


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


ProxyFactory = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def make_proxy(upstream: CountingUpstream) -> Any:
    clients: list[TestClient] = []

    async def factory(**overrides: Any) -> Proxy:
        config = parse_config(base_config(upstream.url, **overrides), env={})
        clock = ManualClock()
        deps = build_deps(config, clock=clock)
        # No cookie jar: a client that replays Set-Cookie would (rightly) bypass the cache.
        client = TestClient(TestServer(make_proxy_app(deps)), cookie_jar=DummyCookieJar())
        admin = TestClient(TestServer(make_admin_app(deps)))
        for c in (client, admin):
            await c.start_server()
            clients.append(c)
        return Proxy(client, admin, deps, clock)

    yield factory
    for c in reversed(clients):
        await c.close()


@pytest.fixture
async def proxy(make_proxy: ProxyFactory) -> Proxy:
    return await make_proxy()
