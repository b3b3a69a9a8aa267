"""A circuit breaker for the L2: stop calling a dead Redis, probe it with capped backoff."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

State = Literal["closed", "open", "half_open"]
STATE_VALUES: dict[State, int] = {"closed": 0, "open": 1, "half_open": 2}


class CircuitBreaker:
    """Closed until `failures` consecutive failures; then open, letting one probe through
    after `backoff` seconds, doubling up to `max_backoff` while probes keep failing.
    A successful call closes it again (FusionCache's and cashews' breaker, in small)."""

    def __init__(
        self,
        failures: int,
        backoff: float,
        max_backoff: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = failures
        self.base_backoff = backoff
        self.max_backoff = max_backoff
        self.state: State = "closed"
        self.reason = ""  # the last failure, for /health
        self.opened = 0  # how many times it opened, for metrics
        self._clock = clock
        self._failures = 0
        self._backoff = backoff
        self._retry_at = 0.0

    def allow(self) -> bool:
        """Whether a call may go to the protected service now."""
        if self.state == "closed":
            return True
        now = self._clock()
        if now < self._retry_at:
            return False
        # One probe per backoff period; a probe that never reports back does not wedge
        # the breaker, because the next period lets another through.
        self.state = "half_open"
        self._retry_at = now + self._backoff
        return True

    def retry_in(self) -> float:
        """Seconds until the next probe may go (0 when closed)."""
        if self.state == "closed":
            return 0.0
        return max(0.0, self._retry_at - self._clock())

    def success(self) -> None:
        """The call worked: close and forget past failures."""
        self.state = "closed"
        self._failures = 0
        self._backoff = self.base_backoff
        self.reason = ""

    def failure(self, reason: str) -> None:
        """The call failed: count it, and open (or stay open, backing off) as needed."""
        self.reason = reason
        if self.state == "open":
            return  # a late failure of a call made before it opened: already counted
        if self.state == "closed":
            self._failures += 1
            if self._failures < self.threshold:
                return
            self.opened += 1
        else:  # a failed probe: wait longer next time
            self._backoff = min(self._backoff * 2, self.max_backoff)
        self.state = "open"
        self._retry_at = self._clock() + self._backoff

    @property
    def is_open(self) -> bool:
        """Whether calls are being refused right now (no side effect, unlike allow())."""
        return self.state != "closed" and self._clock() < self._retry_at
