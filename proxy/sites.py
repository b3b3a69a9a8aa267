"""Listening and stopping: start_site() for a runner on host:port, the stop signals, and
drain(), the graceful shutdown of listeners (for `serve`, the demo and the simulator)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("cacheproxy")
_DRAIN_POLL = 0.05  # seconds between looks at the connections still open


async def start_site(
    app: web.Application | web.Server, host: str, port: int, shutdown_timeout: float = 60.0
) -> web.BaseRunner:
    """Set up a runner for an application (admin) or a low-level server (the proxy) and
    listen on host:port; if it cannot listen (the port is taken), the runner is cleaned up."""
    runner: web.BaseRunner
    if isinstance(app, web.Application):
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout
        )
    else:
        runner = web.ServerRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout
        )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=1024).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


class StopSignals:
    """SIGINT or SIGTERM: the first asks for a graceful shutdown, a second cuts it short."""

    def __init__(self) -> None:
        self.first = asyncio.Event()
        self.second = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._received, sig)

    def _received(self, sig: signal.Signals) -> None:
        if self.first.is_set():
            log.warning("%s again: cutting the requests still in flight", sig.name)
            self.second.set()
        else:
            self.first.set()


async def wait_for_signal() -> None:
    """Return on the first SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def drain(runners: Sequence[web.BaseRunner], grace: float, cut: asyncio.Event) -> None:
    """Graceful shutdown: stop listening at once, give requests in flight up to `grace`
    seconds (or until `cut` is set) to finish, then cancel what remains. The caller then
    closes the proxy (which lets L2 writes in flight land)."""
    for runner in runners:
        for site in list(runner.sites):
            await site.stop()  # new connections are refused from here on
    await asyncio.sleep(0)  # let connections accepted just now start reading their request
    servers = [runner.server for runner in runners if runner.server is not None]
    for server in servers:
        for connection in server.connections:
            connection.close()  # no further request on it: it closes after its response
    await asyncio.sleep(0)  # requests already read start; idle connections stop waiting
    for server in servers:
        for connection in server.connections:
            if not _busy(connection):
                connection.force_close()  # idle keep-alive: close now, the client reconnects
    log.info("shutting down: listeners closed; %d requests in flight, grace %gs",
             _in_flight(servers), grace)  # fmt: skip
    try:
        async with asyncio.timeout(grace):
            # aiohttp has no event for a request's end, so look every _DRAIN_POLL.
            while _in_flight(servers) and not cut.is_set():  # noqa: ASYNC110
                await asyncio.sleep(_DRAIN_POLL)
    except TimeoutError:
        pass
    if left := _in_flight(servers):
        log.warning("shutting down: cutting %d requests still in flight", left)
    # Each runner's cleanup cancels what is left (within its shutdown_timeout) and closes
    # the rest.
    await asyncio.gather(*(runner.cleanup() for runner in runners))
    log.info("listeners shut down")


def _busy(connection: RequestHandler) -> bool:
    # The flag aiohttp's own shutdown reads; there is no public one. If it were renamed, every
    # connection would count as busy and the drain would wait out the grace period (a test
    # with an idle keep-alive connection catches that).
    return bool(getattr(connection, "_request_in_progress", True))


def _in_flight(servers: Sequence[web.Server]) -> int:
    return sum(_busy(c) for server in servers for c in server.connections)
