"""Deps: everything the handlers need, built once in cli.build_deps and reached by AppKey."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from proxy.clock import Clock, system_clock
from proxy.coalesce import Coalescer
from proxy.config import Config
from proxy.metrics import Metrics
from proxy.store.memory import MemoryStore
from proxy.tasks import Tasks
from proxy.upstream import UpstreamPool


@dataclass(slots=True)
class Deps:
    """The running proxy's parts. `config` may be swapped by a reload; the rest persist."""

    config: Config
    store: MemoryStore
    metrics: Metrics
    upstreams: UpstreamPool
    clock: Clock = system_clock
    coalescer: Coalescer = field(default_factory=Coalescer)
    tasks: Tasks = field(default_factory=Tasks)


def build_deps(config: Config, clock: Clock = system_clock, metrics: Metrics | None = None) -> Deps:
    """Wire the stores, metrics and upstream sessions for a config (sessions open on start)."""
    metrics = metrics or Metrics()
    store = MemoryStore(config.cache.l1_max_entries, config.cache.l1_max_bytes, clock)
    metrics.watch_store("l1", store)
    return Deps(
        config=config,
        store=store,
        metrics=metrics,
        upstreams=UpstreamPool(config.upstreams, metrics),
        clock=clock,
    )


DEPS = web.AppKey("deps", Deps)
