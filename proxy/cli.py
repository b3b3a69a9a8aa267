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

from proxy.accesslog import configure as configure_access_log
from proxy.admin import make_admin_app
from proxy.config import Config, load_config
from proxy.deps import build_deps
from proxy.errors import ConfigError
from proxy.reload import reload
from proxy.server import ProxyApp, quiet_malformed
from proxy.sites import StopSignals, drain, start_site

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


async def serve(config: Config, path: Path | None = None) -> None:
    """Run the proxy and admin listeners until SIGINT or SIGTERM; SIGHUP reloads `path`."""
    deps = build_deps(config)
    deps.config_path = path
    asyncio.get_running_loop().add_signal_handler(
        signal.SIGHUP, lambda: deps.tasks.spawn(reload(deps), "reload-on-sighup")
    )
    stop = StopSignals()
    server = config.server
    runners: list[web.BaseRunner] = []
    # On leaving: L2 writes in flight land, then sessions and stores close.
    async with ProxyApp(deps).running() as proxy:
        try:
            for app, host, port in (
                (proxy.server(), server.host, server.port),
                (make_admin_app(deps), server.admin_host, server.admin_port),
            ):
                runners.append(await start_site(app, host, port, _CUT_TIMEOUT))
            log.info(
                "cacheproxy serving on %s:%d, admin on %s:%d, %d routes, backend %s",
                server.host, server.port, server.admin_host, server.admin_port,
                len(config.routes), config.cache.backend,
            )  # fmt: skip
            await stop.first.wait()
            deps.closing = True  # responses from here on say Connection: close
        finally:
            # Read now, not at start: a reload may have changed it.
            await drain(runners, deps.config.server.shutdown_grace, stop.second)
    log.info("shut down")


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
