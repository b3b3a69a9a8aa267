"""An upstream's quota counted alone while the shared counter (Redis) cannot be reached
(issue 13 item 3): this instance spends only its share of each window, and keeps what it
spent so that the shared count includes it once Redis answers again.

The share of a window is its limit divided by the live instances this one last knew of,
rounded down (`Fleet.live`, itself included). A share of 0 (3 instances, `2/s`) lets no call
go in that window until Redis answers again: the upstream's stale copies serve meanwhile.

Two moments are where a fleet could overspend, and both are held back:
- Going alone: the fleet may already have reserved every slot of a sliding window, up to
  the longest wait it grants (`max_wait`) past the moment Redis was lost, and this instance
  does not know who holds them. So its first call alone starts a period after that.
- Coming back: other instances may still count alone (their breakers probe later), with
  calls Redis does not know yet. For `grace` seconds (longer than any instance takes to
  find Redis again) plus a period, a call needs room in both this instance's share and the
  shared count.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Final

from proxy.quota import Answer, LocalQuota, Refused, Window

SHARE_RETRY: Final = 60.0  # a refusal alone says at most this: Redis may answer sooner


def share(window: Window, live: int) -> int:
    """Calls this instance may start per `window.period` (sliding) or per day, alone among
    `live` instances: the limit divided by them, rounded down."""
    limit = window.calls if window.sliding else int(window.count)
    return limit // max(1, live)


@dataclass(frozen=True, slots=True)
class Standing:
    """How an upstream's quota is counted now: `shared` (Redis), or alone among `live`."""

    shared: bool
    live: int = 1

    @property
    def share(self) -> str:
        """`1/3`: this instance's part of every window."""
        return f"1/{self.live}"


class Alone:
    """One upstream's spending alone: when it began, what was spent, and the grace after it
    ended. Times are the guard's monotonic clock."""

    def __init__(self, windows: tuple[Window, ...], grace: float) -> None:
        self.windows = windows
        sliding = [w.period for w in windows if w.sliding]
        self.longest = max(sliding, default=0.0)
        self.grace = grace + self.longest
        self.since: float | None = None  # alone since then (None: counting in Redis)
        self.live = 1  # the fleet's size when last alone
        self._max_wait = 0.0  # the longest wait asked of the shared store
        self._resumed: float | None = None
        # Calls started alone and not yet in the shared count: times per sliding window
        # (the last `calls` of them, all a window can still hold), a count per day window.
        self._starts = [deque[float](maxlen=w.calls) for w in windows]
        self._days: dict[float, int] = {}

    @property
    def standing(self) -> Standing:
        """Shared, or alone with this share."""
        return Standing(self.since is None, 1 if self.since is None else self.live)

    def asked(self, max_wait: float) -> None:
        """A reservation asked of the shared store may wait this long."""
        self._max_wait = max(self._max_wait, max_wait)

    def spent(self, now: float, day_start: float) -> tuple[tuple[float, ...], ...]:
        """What to add to the shared count with the next reservation (QuotaAsk.spent)."""
        if not any(self._starts) and not self._days:
            return ()
        return tuple(
            tuple(now - t for t in starts if now - t < w.period)
            if w.sliding
            else (float(self._days.get(day_start, 0)),)
            for w, starts in zip(self.windows, self._starts, strict=True)
        )

    def answered(self, now: float) -> None:
        """The shared store answered (and added what was spent alone): counting there again."""
        if self.since is not None:
            self._resumed = now
        self.since = None
        for starts in self._starts:
            starts.clear()
        self._days.clear()

    def in_grace(self, now: float) -> bool:
        """Just back from counting alone: a call needs room in this instance's share too."""
        if self._resumed is not None and now >= self._resumed + self.grace:
            self._resumed = None
        return self._resumed is not None

    def gated(self, now: float) -> bool:
        """Alone, or just back: a call needs room in this instance's share first."""
        return self.since is not None or self.in_grace(now)

    def reserve(
        self, quota: LocalQuota, max_wait: float, live: int, now: float, day_start: float
    ) -> Answer:
        """Redis was just found unreachable: reserve a slot in this instance's share of every
        window, or in none, and keep it to hand over."""
        if self.since is None:
            self.since = now
        answer = self.gate(quota, max_wait, live)
        if not isinstance(answer, Refused):
            self.record(now + answer.wait, day_start)
        return answer

    def gate(self, quota: LocalQuota, max_wait: float, live: int) -> Answer:
        """Reserve a slot in this instance's share of every window (`quota` counts what it
        spent, through Redis too), or in none."""
        self.live = live
        shares = tuple(share(w, live) for w in self.windows)
        if 0 in shares:
            retry = min((w.period for w in self.windows if w.sliding), default=SHARE_RETRY)
            return Refused(min(retry, SHARE_RETRY), used=quota.used())
        # Others may hold every slot until their last granted wait, then a period more (alone
        # in the fleet, this instance's own log holds all the fleet spent).
        not_before = -math.inf
        if self.since is not None and live > 1 and self.longest:
            not_before = self.since + self._max_wait + self.longest
        answer = quota.reserve(max_wait, shares, not_before)
        if isinstance(answer, Refused):
            return Refused(min(answer.retry_after, SHARE_RETRY), answer.paused, answer.used)
        return answer

    def record(self, start: float, day_start: float) -> None:
        """A call admitted alone, starting at `start`."""
        for w, starts in zip(self.windows, self._starts, strict=True):
            if w.sliding:
                starts.append(start)
        if not all(w.sliding for w in self.windows):
            for old in [d for d in self._days if d < day_start]:
                del self._days[old]  # a past day's calls no longer count anywhere
            self._days[day_start] = self._days.get(day_start, 0) + 1
