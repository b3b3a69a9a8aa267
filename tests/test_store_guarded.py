"""proxy/store/guarded.py: every call to a remote store goes through its breaker, whatever
role it plays (tier or shared store), and an open breaker refuses it without asking Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from uuid import uuid4

import pytest

from proxy.breaker import CircuitBreaker
from proxy.clock import ManualClock
from proxy.config import RedisConfig
from proxy.entry import CachedResponse
from proxy.errors import StoreUnavailable
from proxy.store.guarded import Guarded, GuardedShared
from proxy.store.redis import RedisStore
from proxy.tasks import Tasks


def entry(clock: ManualClock) -> CachedResponse:
    return CachedResponse(200, (), b"x", clock(), 60.0)


class Flaky:
    """Forwards to a RedisStore, counting calls; fails every call while `down`."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.calls = 0
        self.down = False

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.store, name)
        if name in ("stats", "reaches_others"):
            return method

        def call(*args: Any) -> Any:
            self.calls += 1
            if self.down:
                raise StoreUnavailable("redis: down")
            return method(*args)

        return call


@pytest.fixture
async def flaky(redis_server: Any, clock: ManualClock, tasks: Tasks) -> AsyncIterator[Flaky]:
    config = RedisConfig(url=redis_server.url, key_prefix=f"t{uuid4().hex[:8]}:")
    store = RedisStore(config, tasks, clock)  # a real one: leases are Lua
    yield Flaky(store)
    await store.clear()
    await store.close()


async def drain(iterator: AsyncIterator[Any]) -> list[Any]:
    return [x async for x in iterator]


Call = Callable[[Guarded, GuardedShared, ManualClock], Awaitable[Any]]
CALLS: dict[str, Call] = {
    "get": lambda t, s, c: t.get("k"),
    "set": lambda t, s, c: t.set("k", entry(c)),
    "delete": lambda t, s, c: t.delete("k"),
    "delete_matching": lambda t, s, c: t.delete_matching("k*"),
    "clear": lambda t, s, c: t.clear(),
    "scan_page": lambda t, s, c: t.scan_page("*", 0, 10),
    "exists_many": lambda t, s, c: t.exists_many(["k"]),
    "acquire_lease": lambda t, s, c: s.acquire_lease("k", "a", 1.0),
    "lease_held": lambda t, s, c: s.lease_held("k"),
    "release_lease": lambda t, s, c: s.release_lease("k", "a"),
    "save_bans": lambda t, s, c: s.save_bans({"tag=x": b"[1, 0]"}, ()),
    "load_bans": lambda t, s, c: s.load_bans(),
    "add_popularity": lambda t, s, c: s.add_popularity({"k": 1}),
    "hottest": lambda t, s, c: s.hottest(3),
    "publish": lambda t, s, c: s.publish("events", b"x"),
}


@pytest.mark.parametrize("name", list(CALLS))
async def test_every_call_goes_through_the_one_breaker(
    flaky: Flaky, clock: ManualClock, name: str
) -> None:
    breaker = CircuitBreaker(2, 1.0, 8.0, clock=clock)
    tier, shared = Guarded(flaky, breaker), GuardedShared(flaky, breaker)
    call = CALLS[name]
    await call(tier, shared, clock)  # up: it reaches Redis, and the breaker stays closed
    assert (flaky.calls, breaker.state) == (1, "closed")

    flaky.down = True
    for _ in range(2):
        with pytest.raises(StoreUnavailable):
            await call(tier, shared, clock)
    assert (flaky.calls, breaker.state, breaker.reason) == (3, "open", "redis: down")
    with pytest.raises(StoreUnavailable, match="circuit open"):  # refused here ...
        await call(tier, shared, clock)
    assert flaky.calls == 3  # ... without asking Redis

    flaky.down = False
    clock.advance(1.0)  # a probe is due: it goes, works, and closes the breaker
    await call(tier, shared, clock)
    assert (flaky.calls, breaker.state) == (4, "closed")


async def test_scan_is_refused_while_open_and_its_failure_counts(
    flaky: Flaky, clock: ManualClock
) -> None:
    breaker = CircuitBreaker(1, 1.0, 8.0, clock=clock)
    tier = Guarded(flaky, breaker)
    await flaky.store.set("k", entry(clock))
    assert [k for k, _ in await drain(tier.scan())] == ["k"]
    flaky.down = True
    with pytest.raises(StoreUnavailable):
        await drain(tier.scan())
    assert breaker.state == "open" and flaky.calls == 2
    with pytest.raises(StoreUnavailable, match="circuit open"):  # refused, Redis unasked
        await drain(tier.scan())
    assert flaky.calls == 2
    clock.advance(1.0)  # once a probe is due, a walk goes, but is not the probe: it
    flaky.down = False  # neither takes the probe's turn nor closes the breaker
    assert [k for k, _ in await drain(tier.scan())] == ["k"]
    assert flaky.calls == 3 and breaker.state == "open"
    assert await tier.get("k") is not None  # the probe
    assert breaker.state == "closed"


async def test_stats_name_and_reach_are_the_wrapped_stores(
    flaky: Flaky, clock: ManualClock
) -> None:
    breaker = CircuitBreaker(1, 1.0, 8.0, clock=clock)
    tier, shared = Guarded(flaky, breaker), GuardedShared(flaky, breaker)
    await tier.set("k", entry(clock))
    assert await tier.get("k") == entry(clock)
    assert tier.stats is flaky.store.stats and tier.stats.sets == 1 and tier.stats.hits == 1
    assert tier.name == "l2"
    assert shared.reaches_others is True
