"""proxy/store/redisquota.py: upstream quotas counted in a real Redis for the whole fleet
(clocks injected: nothing sleeps for time to pass)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from conftest import RedisServer

from proxy.breaker import CircuitBreaker
from proxy.clock import ManualClock
from proxy.config import RedisConfig
from proxy.errors import UpstreamError
from proxy.guard import UpstreamGuard
from proxy.quota import Admitted, QuotaAsk, QuotaReset, Refused, Window
from proxy.store.guarded import GuardedShared
from proxy.store.redis import RedisStore
from proxy.store.redisquota import _answer
from proxy.tasks import Tasks


def _at(text: str, zone: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp()


@pytest.fixture
async def stores(redis_server: RedisServer) -> AsyncIterator[list[RedisStore]]:
    """Four RedisStores, each with its own client: four instances on one Redis and prefix."""
    config = RedisConfig(url=redis_server.url, key_prefix=f"q{uuid.uuid4().hex[:8]}:",
                         command_timeout=2.0)  # fmt: skip
    tasks = Tasks()
    made = [RedisStore(config, tasks) for _ in range(4)]
    yield made
    for store in made:
        await store.close()
    await tasks.close()


def _windows(*texts: str) -> tuple[Window, ...]:
    return tuple(Window.parse(t) for t in texts)


def _never_exceeds(starts: list[float], window: Window) -> None:
    starts = sorted(starts)
    for i in range(len(starts) - window.calls):
        assert starts[i + window.calls] - starts[i] >= window.period - 1e-6, (window, starts)


async def test_concurrent_reservations_from_several_clients_never_exceed_any_window(
    stores: list[RedisStore],
) -> None:
    windows = _windows("5/s", "12/min", "100/day")
    now = 1_700_000_000.0
    starts: list[float] = []
    for step in range(8):  # eight rounds, half a second apart, of 40 calls from 4 instances
        t = now + step * 0.5
        ask = QuotaAsk(windows, max_wait=3.0, day_start=now - 3600, until_reset=7200, now=t)
        answers = await asyncio.gather(
            *(store.reserve_quota("api", ask) for store in stores for _ in range(10))
        )
        starts += [t + a.wait for a in answers if isinstance(a, Admitted)]
        assert all(isinstance(a, Admitted) or a.retry_after > 0 for a in answers)
    for window in windows[:2]:
        _never_exceeds(starts, window)
    assert len(starts) == 12  # the minute's 12, at 5, 5 and 2 a second
    day_key = stores[0].quota.keys("api", ask)[3]
    assert int(await stores[0].client.get(day_key)) == 12


async def test_redis_time_counts_sliding_windows_when_no_time_is_passed(
    stores: list[RedisStore],
) -> None:
    windows = _windows("5/s")
    ask = QuotaAsk(windows, max_wait=0.0, day_start=0.0, until_reset=86400)
    started = time.monotonic()
    answers = await asyncio.gather(
        *(store.reserve_quota("api", ask) for store in stores for _ in range(10))
    )
    elapsed = time.monotonic() - started
    admitted = sum(isinstance(a, Admitted) for a in answers)
    assert 5 <= admitted <= 5 * (1 + int(elapsed))  # 5 unless the burst outlasted a second
    zset = stores[0].quota.keys("api", ask)[1]
    scores = [s for _, s in await stores[0].client.zrange(zset, 0, -1, withscores=True)]
    assert all(abs(s - time.time()) < 60 for s in scores)  # Redis's clock: epoch seconds


def _guards(
    stores: list[RedisStore], clock: ManualClock, windows: str, reset: str
) -> list[UpstreamGuard]:
    """One guard per instance, counting through its store's breaker, all on one clock."""
    return [
        UpstreamGuard(
            "api", _windows(*windows.split()), CircuitBreaker(5, 1, 60, clock), clock,
            QuotaReset.parse(reset), clock,
            GuardedShared(store, CircuitBreaker(3, 0.5, 30, clock)), clock,
        )
        for store in stores
    ]


async def test_day_window_is_shared_and_resets_at_the_configured_time_in_its_zone(
    stores: list[RedisStore],
) -> None:
    clock = ManualClock(_at("2024-03-05 09:00", "America/New_York"))
    guards = _guards(stores[:3], clock, "3/s 20/day", "00:00 America/New_York")
    admitted = 0
    for step in range(60):
        for guard in guards:
            try:
                await guard.admit(0)
                admitted += 1
            except UpstreamError as e:
                assert e.kind == "rate-limited"
        clock.advance(0.5 if step % 2 else 60)
    assert admitted == 20  # the fleet's day, however many instances spend it
    reset = _at("2024-03-06 00:00", "America/New_York")
    with pytest.raises(UpstreamError) as refused:
        await guards[1].admit(5)
    assert refused.value.retry_after == pytest.approx(reset - clock.now, abs=0.01)
    assert [used for _, used in guards[2].usage()] == [0, 20]
    clock.now = reset - 0.01
    with pytest.raises(UpstreamError):
        await guards[0].admit(0)
    clock.now = reset  # midnight in New York: a new day for every instance
    for guard in guards:
        assert await guard.admit(0) == 0.0
    assert [used for _, used in guards[2].usage()] == [3, 3]  # as Redis last said


async def test_a_429_on_one_instance_pauses_the_fleet(stores: list[RedisStore]) -> None:
    clock = ManualClock()
    one, other = _guards(stores[:2], clock, "100/s", "00:00 UTC")
    assert await other.admit(0) == 0.0
    await one.answered(429, "30")
    with pytest.raises(UpstreamError) as paused:
        await other.admit(0)
    assert paused.value.kind == "rate-limited"
    assert paused.value.retry_after == pytest.approx(30)
    await one.answered(429, "5")  # a shorter pause does not cut the longer one
    clock.advance(29)
    with pytest.raises(UpstreamError):
        await other.admit(0)
    clock.advance(1)
    assert await other.admit(0) == 0.0
    assert await one.admit(0) == 0.0


async def test_reserve_is_all_or_nothing(stores: list[RedisStore]) -> None:
    windows = _windows("2/s", "3/min")
    now = 1_700_000_000.0
    ask = QuotaAsk(windows, max_wait=0.0, day_start=0, until_reset=86400, now=now)
    assert [await stores[0].reserve_quota("api", ask) for _ in range(3)] == [
        Admitted(0.0, (1, 1)), Admitted(0.0, (2, 2)), Refused(1.0, used=(2, 2)),
    ]  # fmt: skip
    later = QuotaAsk(windows, max_wait=0.0, day_start=0, until_reset=86400, now=now + 1)
    assert await stores[1].reserve_quota("api", later) == Admitted(0.0, (1, 3))
    refused = await stores[1].reserve_quota("api", later)
    assert refused == Refused(59.0, used=(1, 3))  # the second had room, the minute did not
    zset = stores[0].quota.keys("api", ask)[1]
    assert await stores[0].client.zcard(zset) == 1  # nothing reserved by the refused call


async def test_redis_down_falls_back_to_local_windows_without_stalling(
    redis_proc: RedisServer,
) -> None:
    config = RedisConfig(url=redis_proc.url, key_prefix="down:", command_timeout=0.2,
                         connect_timeout=0.2)  # fmt: skip
    tasks = Tasks()
    store = RedisStore(config, tasks)
    clock = ManualClock()
    try:
        (guard,) = _guards([store], clock, "5/s", "00:00 UTC")
        for _ in range(3):
            assert await guard.admit(0) == 0.0  # counted in Redis (and here)
        assert guard.fallbacks == 0
        redis_proc.stop()
        admitted = 0
        for _ in range(10):
            started = time.monotonic()
            try:
                await guard.admit(0)
                admitted += 1
            except UpstreamError as e:
                assert e.kind == "rate-limited"  # the local window: never "Redis is down"
            assert time.monotonic() - started < 0.4 + 0.2  # the command timeout at most
        assert admitted == 2  # what this second had left here
        assert guard.fallbacks >= 1
        clock.advance(1)
        assert await guard.admit(0) == 0.0
    finally:
        await store.close()
        await tasks.close()


async def test_what_was_spent_alone_is_added_to_the_shared_count(
    stores: list[RedisStore],
) -> None:
    windows = _windows("6/s", "100/day")
    now, day = 1_700_000_000.0, 1_699_920_000.0
    store = stores[0]
    ask = QuotaAsk(windows, 5.0, day, 3600.0, now)
    assert await store.reserve_quota("api", ask) == Admitted(0.0, (1, 1))
    # Redis was gone; meanwhile this instance started 3 calls (0.9, 0.5 and 0.1 s ago in
    # this second, 4 today): the next reservation adds them first, then counts itself.
    spent = QuotaAsk(windows, 5.0, day, 3600.0, now + 2.0, ((0.9, 0.5, 0.1), (4.0,)))
    assert await store.reserve_quota("api", spent) == Admitted(0.0, (4, 6))
    # The fleet's count includes them: another instance finds 4 of this second's 6 taken.
    after = QuotaAsk(windows, 0.0, day, 3600.0, now + 2.0)
    assert await stores[1].reserve_quota("api", after) == Admitted(0.0, (5, 7))
    assert await stores[2].reserve_quota("api", after) == Admitted(0.0, (6, 8))
    refused = await stores[3].reserve_quota("api", after)
    assert refused == Refused(pytest.approx(0.1), used=(6, 8))  # 1.1 s, the oldest's end


async def test_a_reservation_refused_still_adds_what_was_spent_alone(
    stores: list[RedisStore],
) -> None:
    windows = _windows("2/s", "10/day")
    now, day = 1_700_000_000.0, 1_699_920_000.0
    spent = QuotaAsk(windows, 0.0, day, 3600.0, now, ((0.3, 0.2), (9.0,)))
    assert await stores[0].reserve_quota("api", spent) == Refused(pytest.approx(0.7), used=(2, 9))
    last = QuotaAsk(windows, 0.0, day, 3600.0, now + 1.0)
    assert await stores[1].reserve_quota("api", last) == Admitted(0.0, (1, 10))
    assert isinstance(await stores[1].reserve_quota("api", last), Refused)  # the day is spent


async def test_a_hand_over_only_adds_what_was_spent_and_reserves_nothing(
    stores: list[RedisStore],
) -> None:
    windows = _windows("6/s", "100/day")
    now, day = 1_700_000_000.0, 1_699_920_000.0
    hand_over = QuotaAsk(windows, -1.0, day, 3600.0, now, ((0.5, 0.25), (2.0,)))
    assert await stores[0].reserve_quota("api", hand_over) == Refused(0.0, used=(2, 2))
    again = QuotaAsk(windows, 0.0, day, 3600.0, now)
    assert await stores[1].reserve_quota("api", again) == Admitted(0.0, (3, 3))


@pytest.mark.parametrize(
    "reply",
    [[[b"0"], b"1"], [b"0", b"1", None], [b"0", [b"1"]], [b"x", b"1"], None, [b"0"]],
)
def test_a_reply_that_is_not_the_scripts_is_a_value_error(reply: object) -> None:
    # A nested list or a nil raised TypeError, which only ValueError is caught for: a 500.
    with pytest.raises(ValueError, match="unexpected quota reply"):
        _answer(reply, 1)
