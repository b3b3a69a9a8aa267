"""proxy/breaker.py: closed, open, half-open probes with capped doubling backoff."""

from __future__ import annotations

import pytest

from proxy.breaker import STATE_VALUES, CircuitBreaker
from proxy.clock import ManualClock


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=1000.0)


def tripped(
    clock: ManualClock, failures: int = 3, backoff: float = 1.0, cap: float = 8.0
) -> CircuitBreaker:
    """A breaker that has just opened (after `failures` failures, the last "boom")."""
    breaker = CircuitBreaker(failures, backoff, cap, clock=clock)
    for i in range(failures):
        breaker.failure("boom" if i == failures - 1 else f"f{i}")
    assert breaker.state == "open"
    return breaker


@pytest.mark.parametrize(
    ("threshold", "calls", "state"),
    [
        (3, "", "closed"),
        (3, "ff", "closed"),
        (3, "fff", "open"),
        (3, "ffsff", "closed"),  # a success in between resets the count
        (3, "ffsfff", "open"),
        (3, "fsfsfsfs", "closed"),
        (1, "f", "open"),
        (5, "ffff", "closed"),
        (5, "fffff", "open"),
    ],
)
def test_opens_after_consecutive_failures(
    clock: ManualClock, threshold: int, calls: str, state: str
) -> None:
    breaker = CircuitBreaker(threshold, 1.0, 8.0, clock=clock)
    for c in calls:
        if c == "f":
            breaker.failure("x")
        else:
            breaker.success()
    assert breaker.state == state
    assert breaker.allow() is (state == "closed")


def test_closed_always_allows(clock: ManualClock) -> None:
    breaker = CircuitBreaker(3, 1.0, 8.0, clock=clock)
    assert all(breaker.allow() for _ in range(10))
    assert breaker.state == "closed"


def test_open_refuses_until_backoff_passes(clock: ManualClock) -> None:
    breaker = tripped(clock, backoff=1.0)
    for step in (0.0, 0.5, 0.49):
        clock.advance(step)
        assert breaker.allow() is False
        assert breaker.state == "open"
    clock.advance(0.01)  # exactly at the retry time
    assert breaker.allow() is True
    assert breaker.state == "half_open"


def test_one_probe_per_backoff_period(clock: ManualClock) -> None:
    breaker = tripped(clock, backoff=1.0)
    clock.advance(1.0)
    assert [breaker.allow() for _ in range(5)] == [True, False, False, False, False]
    clock.advance(0.99)
    assert breaker.allow() is False
    # A probe that never reports back does not wedge it: the next period lets one through.
    clock.advance(0.01)
    assert [breaker.allow() for _ in range(3)] == [True, False, False]
    assert breaker.state == "half_open"


def test_failed_probes_double_backoff_up_to_max(clock: ManualClock) -> None:
    breaker = tripped(clock, backoff=1.0, cap=5.0)
    waits = []
    for _ in range(6):
        wait = 0.0
        while not breaker.allow():
            clock.advance(0.25)
            wait += 0.25
            assert wait < 100
        waits.append(wait)
        assert breaker.state == "half_open"
        breaker.failure("still down")
        assert breaker.state == "open"
    # The first wait is the base backoff; each failed probe doubles it, capped at 5.
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_success_closes_and_resets_backoff_and_reason(clock: ManualClock) -> None:
    breaker = tripped(clock, backoff=1.0, cap=8.0)
    for _ in range(3):  # back off to 8 s
        clock.advance(100)
        assert breaker.allow()
        breaker.failure("still down")
    clock.advance(100)
    assert breaker.allow()
    breaker.success()
    assert (breaker.state, breaker.reason) == ("closed", "")
    assert breaker.allow()
    # Opening again starts from the base backoff, and needs the full threshold again.
    breaker.failure("a")
    breaker.failure("b")
    assert breaker.state == "closed"
    breaker.failure("c")
    assert breaker.state == "open"
    clock.advance(0.99)
    assert breaker.allow() is False
    clock.advance(0.01)
    assert breaker.allow() is True


def test_opened_counts_closed_to_open_transitions_only(clock: ManualClock) -> None:
    breaker = tripped(clock, backoff=1.0)
    assert breaker.opened == 1
    for _ in range(4):  # failed probes and late failures while open do not count
        clock.advance(100)
        assert breaker.allow()
        breaker.failure("probe failed")
        breaker.failure("late failure")
    assert breaker.opened == 1
    clock.advance(100)
    assert breaker.allow()
    breaker.success()
    assert breaker.opened == 1
    for _ in range(3):
        breaker.failure("again")
    assert breaker.opened == 2


def test_reason_holds_the_last_failure(clock: ManualClock) -> None:
    breaker = CircuitBreaker(3, 1.0, 8.0, clock=clock)
    assert breaker.reason == ""
    breaker.failure("refused")
    assert breaker.reason == "refused"  # even before it opens
    breaker.failure("timeout")
    breaker.failure("reset")
    assert (breaker.state, breaker.reason) == ("open", "reset")
    clock.advance(1.0)
    assert breaker.allow()
    breaker.failure("probe timeout")
    assert breaker.reason == "probe timeout"


def test_state_values_cover_every_state() -> None:
    assert STATE_VALUES == {"closed": 0, "open": 1, "half_open": 2}


def test_late_failures_while_open_do_not_stretch_the_backoff(clock: ManualClock) -> None:
    # 50 requests waited on one failed batch: each reports its failure after the breaker
    # opened. The first probe must still come after the base backoff, not the cap.
    breaker = tripped(clock, failures=3, backoff=1.0, cap=30.0)
    for _ in range(50):
        breaker.failure("late")
    assert breaker.retry_in() == 1.0
    assert breaker.is_open
    clock.advance(1.0)
    assert not breaker.is_open  # checking has no side effect ...
    assert breaker.state == "open"
    assert breaker.allow()  # ... allowing takes the probe slot
    assert breaker.state == "half_open"
