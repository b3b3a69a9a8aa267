"""proxy/quotashare.py through UpstreamGuard: the share an instance spends while Redis cannot
be reached, and what it hands back when it can (clocks injected: nothing sleeps)."""

from __future__ import annotations

import pytest

from proxy.breaker import CircuitBreaker
from proxy.clock import ManualClock
from proxy.errors import StoreUnavailable, UpstreamError
from proxy.guard import UpstreamGuard
from proxy.quota import Admitted, QuotaAsk, Window
from proxy.quotashare import Standing, share


@pytest.mark.parametrize(
    ("rate", "live", "expected"),
    [
        ("6/s", 1, 6), ("6/s", 3, 2), ("5/s", 3, 1), ("6/s", 4, 1), ("2/s", 3, 0),
        ("8/min", 3, 2), ("25/day", 3, 8), ("800/day", 7, 114), ("1.5/s", 2, 0),
        ("6/s", 0, 6),  # never fewer than itself
    ],
)  # fmt: skip
def test_share_is_the_limit_divided_by_live_instances_rounded_down(
    rate: str, live: int, expected: int
) -> None:
    assert share(Window.parse(rate), live) == expected


class Flaky:
    """A shared counter that admits everything while up and is unreachable while down."""

    reaches_others = True

    def __init__(self) -> None:
        self.up = True
        self.asks: list[QuotaAsk] = []

    async def reserve_quota(self, upstream: str, ask: QuotaAsk) -> Admitted:
        self.asks.append(ask)
        if not self.up:
            raise StoreUnavailable("down")
        return Admitted(0.0, tuple(0 for _ in ask.windows))

    async def pause_quota(self, upstream: str, seconds: float, now: float | None) -> None:
        pass


def _guard(
    rates: str, live: int, clock: ManualClock, grace: float = 0.0
) -> tuple[UpstreamGuard, Flaky]:
    shared = Flaky()
    windows = tuple(Window.parse(r) for r in rates.split())
    guard = UpstreamGuard(
        "api", windows, CircuitBreaker(5, 1, 60, clock), clock, wall=clock,
        shared=shared, live=lambda: live, resume_grace=grace,  # type: ignore[arg-type]
    )  # fmt: skip
    return guard, shared


async def _admitted(guard: UpstreamGuard, calls: int) -> int:
    n = 0
    for _ in range(calls):
        try:
            await guard.admit(0)
            n += 1
        except UpstreamError as e:
            assert e.kind == "rate-limited" and e.retry_after is not None
            assert 0 < e.retry_after <= 60
    return n


async def test_alone_an_instance_spends_its_share_of_each_second() -> None:
    clock = ManualClock(1000.0)
    guard, shared = _guard("6/s", 3, clock)
    assert guard.standing() == Standing(shared=True)
    shared.up = False
    assert await _admitted(guard, 10) == 0  # what the fleet may hold: a period first
    assert guard.standing() == Standing(shared=False, live=3)
    assert guard.standing().share == "1/3"  # type: ignore[union-attr]
    clock.advance(1.0)
    for _ in range(5):
        assert await _admitted(guard, 10) == 2  # 6 // 3, every second
        clock.advance(1.0)


async def test_a_share_of_zero_lets_nothing_go_until_redis_answers() -> None:
    clock = ManualClock(1000.0)
    guard, shared = _guard("2/s", 3, clock)
    shared.up = False
    for _ in range(5):
        clock.advance(1.0)
        assert await _admitted(guard, 3) == 0
    shared.up = True
    assert await _admitted(guard, 2) == 0  # Redis is back, but its share (none) holds ...
    assert guard.standing() == Standing(shared=True)  # (found out by handing over nothing)
    clock.advance(1.0)
    assert await _admitted(guard, 2) == 2  # ... for a period (and the grace, here none)


async def test_a_day_share_counts_what_was_spent_today_through_redis() -> None:
    clock = ManualClock(1_700_000_000.0)
    guard, shared = _guard("25/day", 3, clock)
    assert await _admitted(guard, 5) == 5  # through Redis, and mirrored here
    shared.up = False
    assert await _admitted(guard, 10) == 3  # 25 // 3 = 8 today, 5 of them spent
    clock.advance(86400.0)  # the next day: a whole share again
    assert await _admitted(guard, 10) == 8


async def test_a_fleet_of_one_spends_the_whole_limit_at_once() -> None:
    clock = ManualClock(1000.0)
    guard, shared = _guard("6/s", 1, clock)
    assert await _admitted(guard, 4) == 4
    shared.up = False
    assert await _admitted(guard, 10) == 2  # its own log holds all the fleet spent
    assert guard.standing() == Standing(shared=False, live=1)


async def test_what_was_spent_alone_goes_with_the_next_reservation_once() -> None:
    clock = ManualClock(1000.0)
    guard, shared = _guard("6/s 100/day", 3, clock)
    await _admitted(guard, 1)
    assert shared.asks[-1].spent == ()
    shared.up = False
    assert await _admitted(guard, 1) == 0  # gone at 1000.0: a period first
    clock.advance(1.0)
    assert await _admitted(guard, 1) == 1  # at 1001.0
    clock.advance(0.25)
    assert await _admitted(guard, 1) == 1  # at 1001.25
    clock.advance(0.5)
    shared.up = True
    assert await _admitted(guard, 1) == 0  # its share of this second is spent, but ...
    # ... it hands over what it spent alone, reserving nothing: ages in the sliding window
    # (Redis places them by its own clock), a count for the day.
    assert shared.asks[-1].spent == ((0.75, 0.5), (2.0,))
    assert shared.asks[-1].max_wait < 0
    assert guard.standing() == Standing(shared=True)
    clock.advance(1.0)
    assert await _admitted(guard, 1) == 1
    assert shared.asks[-1].spent == ()  # handed over once
    shared.up = False
    clock.advance(10.0)
    assert await _admitted(guard, 1) == 0
    clock.advance(1.0)
    assert await _admitted(guard, 1) == 1
    clock.advance(0.5)
    assert await _admitted(guard, 1) == 1
    assert shared.asks[-1].spent == ((0.5,), (1.0,))  # failed: nothing was handed over ...
    clock.advance(0.5)
    shared.up = True
    assert await _admitted(guard, 1) == 1
    # ... so all of it goes now (but a call a whole second old no longer counts in 1s)
    assert shared.asks[-1].spent == ((0.5,), (2.0,))


async def test_just_back_a_call_needs_room_in_its_share_too() -> None:
    clock = ManualClock(1000.0)
    guard, shared = _guard("6/s", 3, clock, grace=5.0)
    shared.up = False
    assert await _admitted(guard, 1) == 0
    clock.advance(1.0)
    assert await _admitted(guard, 3) == 2
    shared.up = True
    clock.advance(1.0)
    # Others may still count alone, unknown to Redis: 2 a second for grace + a period.
    for _ in range(6):
        assert await _admitted(guard, 6) == 2
        clock.advance(1.0)
    assert await _admitted(guard, 6) == 6
