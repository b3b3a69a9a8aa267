"""Upstream protection: a rate window, 429 pauses and a circuit breaker, per upstream.

Market-data APIs bill and throttle per key: the proxy must never be the reason a key gets
throttled, and must stop hammering an upstream that keeps failing.
"""

from __future__ import annotations

import math
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from proxy.breaker import CircuitBreaker
from proxy.errors import UpstreamError

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_PER = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}


@dataclass(frozen=True, slots=True)
class Rate:
    """`count` requests per `seconds`, e.g. 20/s or 5/min."""

    count: float
    seconds: float

    @property
    def per_second(self) -> float:
        return self.count / self.seconds

    @staticmethod
    def parse(value: object) -> Rate:
        if isinstance(value, str) and (m := _RATE.match(value)):
            count = float(m.group(1))
            if 0 < count < math.inf:  # "9" * 400 is a number too big for a float: inf
                return Rate(count, float(_PER[m.group(2)]))
        raise ValueError(f"expected a rate such as 20/s or 5/min, got {value!r}")


class RateWindow:
    """At most `rate.count` calls in any window of `rate.seconds` (a sliding log).

    A token bucket holding one period's burst lets through that burst plus a period's
    refill, up to twice the limit within one period, which a quota counting calls per
    second or per minute answers with 429. Here a call may start only once the one
    `count` calls before it is a whole period old. A reservation may lie in the future:
    later callers queue behind it, each told exactly how long to wait for its own slot.
    A fractional count (1.5/s) is kept as one call per seconds / count.
    """

    def __init__(self, rate: Rate, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.count = max(1, int(rate.count))
        self.period = self.count / rate.per_second
        self._clock = clock
        self._starts: deque[float] = deque()  # the last `count` reserved start times, ordered

    def _slot(self) -> tuple[float, float]:
        now = self._clock()
        starts = self._starts
        while starts and starts[0] <= now - self.period:
            starts.popleft()
        if len(starts) < self.count:
            return now, now
        return now, max(now, starts[-self.count] + self.period)

    def reserve(self, max_wait: float) -> float | None:
        """Seconds to wait for a slot now reserved, or None (nothing reserved) if that would
        be longer than `max_wait`."""
        now, slot = self._slot()
        if slot - now > max_wait:
            return None
        self._starts.append(slot)
        if len(self._starts) > self.count:
            self._starts.popleft()
        return slot - now

    def next_token(self) -> float:
        """Seconds until a call could start."""
        now, slot = self._slot()
        return slot - now


class UpstreamGuard:
    """Decides whether a call may go to one upstream now, and learns from its answers."""

    def __init__(
        self,
        name: str,
        rate: Rate | None,
        breaker: CircuitBreaker,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.bucket = RateWindow(rate, clock) if rate else None
        self.breaker = breaker
        self.paused_until = 0.0
        self._clock = clock

    def admit(self, max_wait: float) -> float:
        """Seconds to wait before calling (a token is then reserved), or UpstreamError
        ("rate-limited" or "unavailable") with a retry_after when the call must not go."""
        self._refuse_if_paused()
        if not self.breaker.allow():  # takes the probe slot when one is due
            raise self._unavailable()
        if self.bucket is None:
            return 0.0
        wait = self.bucket.reserve(max_wait)
        if wait is None:
            raise UpstreamError(
                "rate-limited", f"rate limit for upstream {self.name} reached",
                retry_after=self.bucket.next_token(),
            )  # fmt: skip
        return wait

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

    def answered(self, status: int, retry_after: str | None) -> None:
        """Learn from a response: a 429 with Retry-After pauses, 5xx counts against the breaker."""
        if status == 429 and (pause := _retry_after(retry_after)) is not None:
            self.paused_until = max(self.paused_until, self._clock() + pause)
        if status >= 500:
            self.breaker.failure(f"answered {status}")
        else:
            self.breaker.success()

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
