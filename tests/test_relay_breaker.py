"""A relayed body (pass-through, or too large to store) that breaks off is an upstream failure
for the breaker, as a stored one is; a client that hangs up mid-relay is not."""

from __future__ import annotations

import asyncio

from aiohttp import web
from conftest import CountingUpstream, ProxyFactory, Reply, eventually


async def _post(port: int) -> bytes:
    """One pass-through POST over a raw socket; everything the proxy sends back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /xhr/ncp HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab")
    try:
        async with asyncio.timeout(5):
            return await reader.read()  # the proxy closes a response it cannot finish
    finally:
        writer.close()


async def test_a_relayed_body_that_breaks_off_counts_against_the_breaker(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    upstream.replies["/xhr/ncp"] = Reply(body=b"x" * 100, truncate=True)
    proxy = await make_proxy()
    port = proxy.client.server.port
    for _ in range(5):  # breaker_failures' default
        answer = await _post(port)
        assert answer.startswith(b"HTTP/1.1 200 ") and len(answer.partition(b"\r\n\r\n")[2]) < 100
    assert upstream.total == 5
    refused = await proxy.client.post("/xhr/ncp", data=b"ab")
    assert refused.status == 503  # the breaker is open: the upstream is not called again
    assert upstream.total == 5


async def test_a_client_hanging_up_mid_relay_is_not_an_upstream_failure(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        upstream.calls[request.path] += 1
        response = web.StreamResponse()
        response.content_length = 2 * 1024 * 1024
        await response.prepare(request)
        await response.write(b"x" * 1024 * 1024)
        await release.wait()  # until the client has gone
        await response.write(b"x" * 1024 * 1024)
        return response

    assert upstream.server is not None
    upstream.server.app.router._frozen = False  # add a route to the running upstream
    upstream.server.app.router.add_post("/slow/relay", slow)
    proxy = await make_proxy(routes=[
        {"name": "slow", "path": "/slow/relay", "methods": ["POST"], "upstream": "api",
         "pass": True},
    ])  # fmt: skip
    port = proxy.client.server.port
    for i in range(6):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /slow/relay HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        async with asyncio.timeout(5):
            await reader.readexactly(64 * 1024)  # the relay is under way
        writer.transport.abort()  # the client goes away mid-body
        release.set()
        # The proxy's handler ends (and is counted) once its next write to the gone client fails.
        await eventually(lambda n=i + 1: sum(proxy.deps.metrics.by_route.values()) == n)
        release.clear()
        breaker = proxy.deps.upstreams.guard("api").breaker
        assert breaker.state == "closed" and breaker.reason == ""
