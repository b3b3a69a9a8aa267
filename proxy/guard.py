"""Upstream protection: quota windows, 429 pauses and a circuit breaker, per upstream.

Market-data APIs bill and throttle per key: the proxy must never be the reason a key gets
throttled, and must stop hammering an upstream that keeps failing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime

from proxy.breaker import CircuitBreaker
from proxy.errors import StoreUnavailable, UpstreamError
from proxy.quota import (
    Admitted,
    Answer,
    LocalQuota,
    QuotaAsk,
    QuotaReport,
    QuotaReset,
    Refused,
    Window,
)
from proxy.quotaheaders import QuotaHeaders
from proxy.quotashare import Alone, Standing
from proxy.store.base import Shared

DAILY_UTC = QuotaReset()
_HAND_OVER_ONLY = -1.0  # a max_wait no slot meets: the shared store adds what was spent alone


class UpstreamGuard:
    """Decides whether a call may go to one upstream now, and learns from its answers.

    Its quota windows are counted by `shared` for every instance (Redis), or in this process
    when there is none (`Solo`) or it cannot be reached. Sliding windows count by `clock`
    (monotonic), day windows by `wall`; `shared_clock` is the time the shared store counts
    by (None: its own, see redisquota.py). While the shared store cannot be reached, each
    window allows this instance its share among the `live()` instances (quotashare.py), and
    for `resume_grace` seconds after (plus a period) a call needs room in both.
    """

    def __init__(
        self,
        name: str,
        windows: tuple[Window, ...],
        breaker: CircuitBreaker,
        clock: Callable[[], float] = time.monotonic,
        reset: QuotaReset = DAILY_UTC,
        wall: Callable[[], float] = time.time,
        shared: Shared | None = None,
        shared_clock: Callable[[], float] | None = None,
        live: Callable[[], int] = lambda: 1,
        resume_grace: float = 0.0,
        quota_headers: QuotaHeaders | None = None,
    ) -> None:
        self.name = name
        self.quota_headers = quota_headers
        self.quota = LocalQuota(windows, reset, clock, wall)
        self.breaker = breaker
        self.paused_until = 0.0
        self.shared = shared
        self.fallbacks = 0  # admissions counted here because the shared store failed
        self._clock = clock
        self._wall = wall
        self._shared_clock = shared_clock
        self._shared_used: tuple[int, ...] | None = None  # what the shared store last counted
        self.alone = Alone(windows, resume_grace)
        self._live = live

    async def admit(self, max_wait: float) -> float:
        """Seconds to wait before calling (a slot is then reserved in every window), or
        UpstreamError ("rate-limited" or "unavailable") with a retry_after when the call
        must not go."""
        self._refuse_if_paused()
        if not self.breaker.allow():  # takes the probe slot when one is due
            raise self._unavailable()
        if not self.quota.windows:
            return 0.0
        answer = await self._reserve(max_wait)
        if isinstance(answer, Admitted):
            return answer.wait
        if answer.paused:  # another instance's 429: held here too, no round trip meanwhile
            self.paused_until = max(self.paused_until, self._clock() + answer.retry_after)
            self._refuse_if_paused()
        raise UpstreamError(
            "rate-limited", f"rate limit for upstream {self.name} reached",
            retry_after=answer.retry_after,
        )  # fmt: skip

    async def _reserve(self, max_wait: float) -> Answer:
        if self.shared is None:
            return self.quota.reserve(max_wait)
        mono = self._clock()
        gate: Admitted | None = None  # alone or just back: this instance's share first
        if self.alone.gated(mono):
            local = self.alone.gate(self.quota, max_wait, self._live())
            if isinstance(local, Refused):
                if self.alone.since is not None:  # still find out whether Redis is back
                    await self._ask(mono, _HAND_OVER_ONLY)
                return local
            gate = local
        answer = await self._ask(mono, max_wait)
        if answer is None and self.alone.since is not None:  # unreachable
            self._shared_used = None
            if gate is not None:  # still alone: the share's slot is taken already
                self.alone.record(mono + gate.wait, self.quota.reset.day_start(self._wall()))
                return gate
            day_start = self.quota.reset.day_start(self._wall())
            live, now = self._live(), self._clock()  # the failure took its time
            return self.alone.reserve(self.quota, max_wait, live, now, day_start)
        if answer is None:  # Solo: counted in process, all of it
            self._shared_used = None
            return self.quota.reserve(max_wait)
        if isinstance(answer, Admitted) and gate is None:
            self.quota.charge(answer.wait)  # what this process spent, for a fallback
        self._shared_used = answer.used
        return answer

    async def _ask(self, mono: float, max_wait: float) -> Answer | None:
        """The shared store's answer, handing over what was spent alone; None from Solo, or
        when it cannot be reached (then `alone.since` is set)."""
        assert self.shared is not None
        wall, reset = self._wall(), self.quota.reset
        day_start = reset.day_start(wall)
        now = None if self._shared_clock is None else self._shared_clock()
        ask = QuotaAsk(self.quota.windows, max_wait, day_start, reset.next_reset(wall) - wall,
                       now, self.alone.spent(mono, day_start))  # fmt: skip
        self.alone.asked(max_wait)
        try:
            answer = await self.shared.reserve_quota(self.name, ask)
        except StoreUnavailable:
            # Counted here alone, in this instance's share, until the shared store answers
            # again (which adds what was spent meanwhile: ask.spent).
            self.fallbacks += 1
            if self.alone.since is None:
                self.alone.since = self._clock()
            return None
        if answer is not None:
            self.alone.answered(self._clock())
        return answer

    def standing(self) -> Standing | None:
        """Whether the quota is counted for the fleet or alone (None: no shared store is
        configured, or no window)."""
        if self.shared is None or not self.shared.reaches_others or not self.quota.windows:
            return None
        return self.alone.standing

    def usage(self) -> list[tuple[Window, int]]:
        """Each window and the calls counted in it: fleet-wide as the shared store last
        said, else this process's count."""
        used = self._shared_used
        if used is None or len(used) != len(self.quota.windows):
            used = self.quota.used()
        return list(zip(self.quota.windows, used, strict=True))

    def paused_for(self) -> float:
        """Seconds left of a 429 pause (0 when not paused)."""
        return max(0.0, self.paused_until - self._clock())

    def recheck(self) -> None:
        """Before sending a call that waited for its token: still not paused, breaker closed?"""
        self._refuse_if_paused()
        if self.breaker.is_open:  # admit() already took this call's probe slot
            raise self._unavailable()

    def _refuse_if_paused(self) -> None:
        now = self._clock()
        if now < self.paused_until:
            raise UpstreamError(
                "rate-limited", f"upstream {self.name} asked us to wait (429 Retry-After)",
                retry_after=self.paused_until - now,
            )  # fmt: skip

    def _unavailable(self) -> UpstreamError:
        return UpstreamError(
            "unavailable", f"upstream {self.name} keeps failing: {self.breaker.reason}",
            retry_after=self.breaker.retry_in(),
        )  # fmt: skip

    async def answered(
        self, status: int, retry_after: str | None, headers: Mapping[str, str] | None = None
    ) -> None:
        """Learn from a response: a 429 with Retry-After pauses (every instance, when the
        quota is shared), 5xx counts against the breaker, `quota_headers` raise a count."""
        if headers is not None:
            await self.learn(headers)
        if status == 429 and (pause := _retry_after(retry_after)) is not None:
            self.paused_until = max(self.paused_until, self._clock() + pause)
            if self.shared is not None and self.quota.windows:
                now = None if self._shared_clock is None else self._shared_clock()
                with contextlib.suppress(StoreUnavailable):  # this instance pauses anyway
                    await self.shared.pause_quota(self.name, pause, now)
        if status >= 500:
            self.breaker.failure(f"answered {status}")
        else:
            self.breaker.success()

    async def learn(self, headers: Mapping[str, str]) -> None:
        """When an answer's `quota_headers` say the upstream counted more calls in a window
        than we did, so do we: here and, when the quota is shared, for every instance."""
        wall = self._wall()
        if self.quota_headers is None:
            return
        if (reported := self.quota_headers.read(headers, wall)) is None:
            return
        window = reported.window
        self.quota.raise_used(window, reported.used, reported.resets_in)
        if self.shared is not None:
            expires = window.period if reported.resets_in is None else reported.resets_in
            reset = self.quota.reset
            now = None if self._shared_clock is None else self._shared_clock()
            report = QuotaReport(window, reported.used, expires, reset.day_start(wall),
                                 reset.next_reset(wall) - wall, now)  # fmt: skip
            with contextlib.suppress(StoreUnavailable):  # counted here in any case
                await self.shared.learn_quota(self.name, report)

    def failed(self, kind: str) -> None:
        """Learn from a call that got no answer (timeout, refused, broken)."""
        self.breaker.failure(kind)


def _retry_after(value: str | None) -> float | None:
    """Seconds from Retry-After (RFC 9110 10.2.3): delta-seconds or an HTTP date, capped at an
    hour; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value[:10]), 3600.0)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max(0.0, when.timestamp() - time.time()), 3600.0)
