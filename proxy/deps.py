"""Deps: everything the handlers need, built once in build_deps and reached by AppKey."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from proxy.backplane import Backplane, Event
from proxy.bans import Bans, ban_horizon
from proxy.breaker import CircuitBreaker
from proxy.clock import Clock, system_clock
from proxy.coalesce import Coalescer
from proxy.config import Config
from proxy.fleet import ANNOUNCE_EVERY, Fleet
from proxy.metrics import Metrics
from proxy.quotastate import QuotaStateFile, state_directory
from proxy.store.base import Shared
from proxy.store.guarded import Guarded, GuardedShared
from proxy.store.layered import LayeredStore
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore
from proxy.tasks import Tasks
from proxy.upstream import UpstreamPool


@dataclass(slots=True)
class Deps:
    """The running proxy's parts. `config` may be swapped by a reload; the rest persist."""

    config: Config
    store: LayeredStore
    metrics: Metrics
    upstreams: UpstreamPool
    tasks: Tasks
    instance: str
    clock: Clock = system_clock
    coalescer: Coalescer = field(default_factory=Coalescer)
    backplane: Backplane | None = None
    fleet: Fleet | None = None  # the instances announcing themselves (None: a fleet of one)
    config_path: Path | None = None  # what /reload and SIGHUP read again
    # Shutdown began: responses not yet started say Connection: close, so a client sends no
    # further request on a connection that closes once its response is out.
    closing: bool = False
    quota_state: QuotaStateFile | None = None  # quota counts across restarts (memory backend)


def build_deps(
    config: Config,
    clock: Clock = system_clock,
    metrics: Metrics | None = None,
    instance: str | None = None,
    guard_clock: Clock = time.monotonic,
    quota_clock: Clock | None = None,
    announce_every: float = ANNOUNCE_EVERY,
) -> Deps:
    """Wire stores, breaker, backplane, metrics and upstream sessions for a config.

    `guard_clock` times rate windows, 429 pauses and upstream breakers; `clock` (wall time)
    day windows; `quota_clock` the windows Redis counts (None: Redis's own clock, so that
    instances with skewed clocks agree; tests pass theirs). With a backplane, instances
    announce themselves every `announce_every` seconds (timed by `guard_clock`).

    Nothing connects here: sessions open and the backplane subscribes when the app starts.
    """
    metrics = metrics or Metrics()
    tasks = Tasks()
    instance = instance or uuid.uuid4().hex[:12]
    cache = config.cache
    l1 = None
    if cache.backend in ("memory", "layered"):
        l1 = MemoryStore(cache.l1_max_entries, cache.l1_max_bytes, clock)
        metrics.watch_store("l1", l1)
    remotes: list[Guarded] = []
    shared: Shared | None = None  # Solo: this instance alone
    backplane = None
    fleet = None
    bans = Bans(ban_horizon(config.ttl_classes.values()), clock)
    if cache.backend in ("redis", "layered"):
        redis = RedisStore(cache.redis, tasks, clock)
        metrics.watch_store("l2", redis)
        breaker = CircuitBreaker(
            cache.redis.breaker_failures,
            cache.redis.breaker_backoff,
            cache.redis.breaker_max_backoff,
        )
        metrics.watch_breaker(breaker)
        # One breaker for Redis, whichever role a call to it plays.
        remotes.append(Guarded(redis, breaker, "l2"))
        shared = GuardedShared(redis, breaker)
    store = LayeredStore(
        l1, remotes, tasks, instance, clock, bans, shared, cache.redis.popularity_flush
    )
    if remotes:
        fleet = Fleet(instance, announce_every, guard_clock)
        backplane = Backplane(
            cache.redis, instance, _events(store, fleet), store.resync,
            on_subscribed=lambda: tasks.spawn(store.banning.load(), "load-bans"),
            on_connection=fleet.connected,
        )  # fmt: skip
    # Coming back from counting quotas alone, shares hold until every instance may have
    # found Redis again: its breaker probes at most this long apart.
    grace = cache.redis.breaker_max_backoff + cache.redis.command_timeout
    upstreams = UpstreamPool(
        config.upstreams, metrics, guard_clock, wall=clock, shared=store.shared,
        shared_clock=quota_clock, live=fleet.live if fleet else lambda: 1, resume_grace=grace,
    )  # fmt: skip
    metrics.watch_quotas(upstreams.quota_usage)
    metrics.watch_fleet(upstreams.quota_standing, fleet.live if fleet else lambda: 1)
    quota_state = None
    if cache.backend == "memory":  # a shared backend's counts live in Redis
        quota_state = QuotaStateFile(
            state_directory(config.server.state_dir, os.environ),
            lambda: {name: guard.quota for name, guard in upstreams.guards.items()}, clock,
        )  # fmt: skip
    return Deps(
        config=config,
        store=store,
        metrics=metrics,
        upstreams=upstreams,
        tasks=tasks,
        instance=instance,
        clock=clock,
        backplane=backplane,
        fleet=fleet,
        quota_state=quota_state,
    )


def _events(store: LayeredStore, fleet: Fleet) -> Callable[[Event], None]:
    """Where another instance's backplane event goes: announcements to the fleet."""

    def on_event(event: Event) -> None:
        if event.op == "alive":
            fleet.heard(event)
        else:
            store.apply(event)

    return on_event


DEPS = web.AppKey("deps", Deps)
