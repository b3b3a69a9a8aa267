"""Command line: serve, check-config, sim, demo. Wiring happens here and nowhere else."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from proxy.accesslog import configure as configure_access_log
from proxy.admin import make_admin_app
from proxy.config import Config, load_config
from proxy.deps import build_deps
from proxy.errors import ConfigError
from proxy.reload import reload
from proxy.server import ProxyApp, quiet_malformed

log = logging.getLogger("cacheproxy")
EXIT_CONFIG = 2


def routes_table(config: Config) -> str:
    """The routes as a fixed-width table, in match order."""
    rows = [("#", "ROUTE", "METHODS", "PATH", "QUERY", "UPSTREAM", "TTL CLASS", "TTL")]
    for i, r in enumerate(config.routes):
        query = " ".join(f"{n}={'|'.join(sorted(v))}" for n, v in r.query) or "-"
        cls = r.ttl_class
        rows.append((
            str(i), r.name, ",".join(sorted(r.methods)), r.template, query, r.upstream,
            cls.name if cls else "(pass)", _seconds(cls.ttl) if cls else "-",
        ))  # fmt: skip
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _seconds(value: float) -> str:
    for unit, size in (("h", 3600), ("m", 60)):
        if value >= size and value % size == 0:
            return f"{int(value // size)}{unit}"
    return f"{value:g}s"


# Once the grace period is over: how long aiohttp waits for the handlers it then cancels.
_CUT_TIMEOUT = 0.5
_DRAIN_POLL = 0.05  # seconds between looks at the connections still open


async def start_site(
    app: web.Application | web.Server, host: str, port: int, shutdown_timeout: float = 60.0
) -> web.BaseRunner:
    """Set up a runner for an application (admin) or a low-level server (the proxy) and
    listen on host:port."""
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
    await web.TCPSite(runner, host, port, backlog=1024).start()
    return runner


async def serve(config: Config, path: Path | None = None) -> None:
    """Run the proxy and admin listeners until SIGINT or SIGTERM; SIGHUP reloads `path`."""
    deps = build_deps(config)
    deps.config_path = path
    asyncio.get_running_loop().add_signal_handler(
        signal.SIGHUP, lambda: deps.tasks.spawn(reload(deps), "reload-on-sighup")
    )
    stop = StopSignals()
    proxy = ProxyApp(deps)
    await proxy.start()
    proxy_runner = await start_site(
        proxy.server(), config.server.host, config.server.port, _CUT_TIMEOUT
    )
    admin_runner = await start_site(
        make_admin_app(deps), config.server.admin_host, config.server.admin_port, _CUT_TIMEOUT
    )
    log.info(
        "cacheproxy serving on %s:%d, admin on %s:%d, %d routes, backend %s",
        config.server.host, config.server.port, config.server.admin_host,
        config.server.admin_port, len(config.routes), config.cache.backend,
    )  # fmt: skip
    await stop.first.wait()
    deps.closing = True  # responses from here on say Connection: close
    # Read now, not at start: a reload may have changed it.
    await drain([proxy_runner, admin_runner], deps.config.server.shutdown_grace, stop.second)
    await proxy.close()  # lets L2 writes in flight land, then closes sessions and stores
    log.info("shut down")


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
    # Each runner's cleanup cancels what is left (within _CUT_TIMEOUT) and closes the rest.
    await asyncio.gather(*(runner.cleanup() for runner in runners))
    log.info("listeners shut down")


def _busy(connection: RequestHandler) -> bool:
    # The flag aiohttp's own shutdown reads; there is no public one. If it were renamed, every
    # connection would count as busy and the drain would wait out the grace period (a test
    # with an idle keep-alive connection catches that).
    return bool(getattr(connection, "_request_in_progress", True))


def _in_flight(servers: Sequence[web.Server]) -> int:
    return sum(_busy(c) for server in servers for c in server.connections)


async def wait_for_signal() -> None:
    """Return on the first SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def run(coro: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed, else the default loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cacheproxy", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=None, help="debug, info, warning, error")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("serve", "run the proxy and the admin port"),
        ("check-config", "validate a config and print its routes table, without serving"),
    ):
        p = sub.add_parser(name, help=help_text, parents=[common])
        p.add_argument("-c", "--config", default="config/proxy.yaml", help="YAML config file")
    sim = sub.add_parser("sim", help="serve the simulated market-data API", parents=[common])
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=9000)
    sim.add_argument("--latency-scale", type=float, default=1.0)
    sim.add_argument("--error-rate", type=float, default=0.0)
    sim.add_argument("--rate-429", type=float, default=0.0)
    demo = sub.add_parser(
        "demo", help="simulator + proxy + Zipf traffic, no network or Redis", parents=[common]
    )
    demo.add_argument("--seconds", type=float, default=30.0, help="how long to run")
    demo.add_argument("--rate", type=float, default=50.0, help="page views per second")
    demo.add_argument("--alpha", type=float, default=1.0, help="Zipf exponent of symbol popularity")
    demo.add_argument("--port", type=int, default=8080, help="proxy port (admin +1, sim +920)")
    demo.add_argument("-c", "--config", default="config/proxy.yaml", help="YAML config file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cacheproxy` console script and `python -m proxy`."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=(args.log_level or "info").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiohttp.server").addFilter(quiet_malformed)
    if args.command in ("serve", "check-config"):
        try:
            config = load_config(args.config)
        except ConfigError as e:
            print(f"cacheproxy: invalid config: {e}", file=sys.stderr)
            return EXIT_CONFIG
        if args.command == "check-config":
            print(
                f"{args.config}: ok ({len(config.routes)} routes, "
                f"{len(config.ttl_classes)} TTL classes, backend {config.cache.backend})"
            )
            print(routes_table(config))
            return 0
        if not args.log_level:
            logging.getLogger().setLevel(config.server.log_level.upper())
        configure_access_log()
        run(serve(config, Path(args.config)))
        return 0
    if args.command == "sim":
        from proxy.demo import run_sim

        run(run_sim(args))
        return 0
    from proxy.demo import run_demo

    run(run_demo(args))
    return 0
