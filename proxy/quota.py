"""Upstream quotas: rate windows as values, the daily reset, and counting in this process.

A quota is one or more windows (`[8/min, 800/day]`): a call goes only when every window has
room. Windows of up to an hour slide (at most `count` calls in any span of that length); a
day window counts calls between two resets at `quota_reset`, as providers count days. The
same windows are counted fleet-wide by a shared store (see `Shared.reserve_quota`); this
module counts them for one process, which is also what an instance falls back to when the
shared store cannot be reached.
"""

from __future__ import annotations

import math
import re
import time
from bisect import bisect_right, insort
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from datetime import time as daytime
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from proxy.confnode import Node

# Spellings of each unit, and the canonical one (the window's string form uses it).
_UNITS: Final = {
    "s": "s", "sec": "s", "second": "s",
    "m": "min", "min": "min", "minute": "min",
    "h": "h", "hour": "h",
    "d": "day", "day": "day",
}  # fmt: skip
UNIT_SECONDS: Final = {"s": 1.0, "min": 60.0, "h": 3600.0, "day": 86400.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([a-z]+)\s*$")
MAX_WINDOWS: Final = 8  # config is untrusted: a bounded list, ...
MAX_SLIDING: Final = 100_000  # ... a sliding window keeps one time per call it allows, ...
MAX_DAILY: Final = 10_000_000  # ... a day window only a counter


@dataclass(frozen=True, slots=True)
class Window:
    """`count` calls per `unit` (s, min, h: sliding; day: between two resets)."""

    count: float
    unit: str

    @staticmethod
    def parse(value: object) -> Window:
        """`20/s`, `5/min`, `1.5/sec`, `3600/hour`, `800/day` (also s/sec/second, m/min/minute,
        h/hour, d/day)."""
        if isinstance(value, str) and (m := _RATE.match(value.lower())) and m[2] in _UNITS:
            count, unit = float(m[1]), _UNITS[m[2]]
            if not 0 < count < math.inf:  # "9" * 400 is a number too big for a float: inf
                raise ValueError(f"a rate needs a positive count, got {value!r}")
            bound = MAX_DAILY if unit == "day" else MAX_SLIDING
            if count > bound:
                raise ValueError(f"at most {bound} calls per {unit}, got {value!r}")
            if unit == "day" and not count.is_integer():
                raise ValueError(f"a day window counts whole calls, got {value!r}")
            return Window(count, unit)
        raise ValueError(f"expected a rate such as 20/s, 5/min or 800/day, got {value!r}")

    def __str__(self) -> str:
        return f"{self.count:g}/{self.unit}"

    @property
    def label(self) -> str:
        """The window's span, as metrics label it: `1s`, `1min`, `1h`, `1day`."""
        return f"1{self.unit}"

    @property
    def sliding(self) -> bool:
        """Sliding (up to an hour), or reset once a day."""
        return self.unit != "day"

    @property
    def seconds(self) -> float:
        """The unit's span."""
        return UNIT_SECONDS[self.unit]

    @property
    def per_second(self) -> float:
        return self.count / self.seconds

    @property
    def calls(self) -> int:
        """Calls allowed per `period`: a fractional count (1.5/s) is kept as one call per
        seconds / count."""
        return max(1, int(self.count))

    @property
    def period(self) -> float:
        """The span in which at most `calls` calls may start."""
        return self.calls / self.per_second


def parse_unit(text: str) -> str | None:
    """A unit's canonical name (`s`, `min`, `h`, `day`) from any of its spellings."""
    return _UNITS.get(text.strip().lower())


def parse_windows(node: Node) -> tuple[Window, ...]:
    """`rate_limit`: one rate or a list of them (empty: unlimited), also written as one
    string (`8/min, 800/day`, the form an environment variable gives). Errors name the item."""
    if isinstance(node.value, str) and "," in node.value:
        text = node.value.strip().removeprefix("[").removesuffix("]")
        node = Node([part.strip() for part in text.split(",")], node.path)
    items = node.sequence() if isinstance(node.value, list) else [node]
    if len(items) > MAX_WINDOWS:
        raise node.error(f"at most {MAX_WINDOWS} windows, got {len(items)}")
    windows = tuple(w for item in items if (w := item.convert(Window.parse, None)) is not None)
    units = [w.unit for w in windows]
    if len(set(units)) != len(units):
        raise node.error(f"one window per unit, got {', '.join(map(str, windows))}")
    return windows


_RESET = re.compile(r"^\s*(\d{1,2}):(\d{2})(?:\s+(\S+))?\s*$")


@dataclass(frozen=True, slots=True)
class QuotaReset:
    """When day windows start afresh: a time of day in a time zone (`00:00 UTC`)."""

    hour: int = 0
    minute: int = 0
    zone: str = "UTC"

    @staticmethod
    def parse(value: object) -> QuotaReset:
        """`HH:MM` with an IANA zone (`00:00 America/New_York`); UTC when none is given."""
        m = _RESET.match(value) if isinstance(value, str) else None
        if m is None or int(m[1]) > 23 or int(m[2]) > 59:
            raise ValueError(
                f"expected a time of day and a zone such as '00:00 UTC', got {value!r}"
            )
        zone = m[3] or "UTC"
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ValueError(f"unknown time zone {zone!r}") from e
        return QuotaReset(int(m[1]), int(m[2]), zone)

    def __str__(self) -> str:
        return f"{self.hour:02d}:{self.minute:02d} {self.zone}"

    def _resets_around(self, now: float) -> list[float]:
        zone = ZoneInfo(self.zone)
        today = datetime.fromtimestamp(now, zone).date()
        at = daytime(self.hour, self.minute)
        days = (today - timedelta(days=1), today, today + timedelta(days=1))
        # zoneinfo resolves a time a DST change skips or repeats (fold=0): still one per day.
        return [datetime.combine(d, at, zone).timestamp() for d in days]

    def day_start(self, now: float) -> float:
        """The last reset at or before `now` (epoch seconds)."""
        return max(t for t in self._resets_around(now) if t <= now)

    def next_reset(self, now: float) -> float:
        """The first reset after `now` (epoch seconds)."""
        return min(t for t in self._resets_around(now) if t > now)


def day_of(stamp: float) -> date:
    """The UTC date of an epoch time (for logs)."""
    return datetime.fromtimestamp(stamp, ZoneInfo("UTC")).date()


@dataclass(frozen=True, slots=True)
class Admitted:
    """The call may go after `wait` seconds: a slot is reserved in every window. `used`:
    calls counted per window (as configured, in order) once this one is."""

    wait: float
    used: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Refused:
    """The call may not go within the wait allowed: nothing was reserved. `paused`: an
    upstream's 429 Retry-After, not a window, refused it."""

    retry_after: float
    paused: bool = False
    used: tuple[int, ...] = ()


Answer = Admitted | Refused


@dataclass(frozen=True, slots=True)
class QuotaAsk:
    """One admission asked of a shared counter, for one upstream's windows."""

    windows: tuple[Window, ...]
    max_wait: float
    day_start: float  # the current day's start (this instance's wall clock, the reset's zone)
    until_reset: float  # seconds from now to the next reset: no call may wait past it
    # The time sliding windows count by; None: the shared store's own clock, so instances
    # with skewed clocks agree (tests pass theirs, to move time without sleeping).
    now: float | None = None
    # Calls this instance admitted alone while the shared counter was unreachable, to add
    # before admitting this one (issue 13 item 3), per window: for a sliding window how long
    # ago each started (negative: not yet), for a day window one number, their count today.
    spent: tuple[tuple[float, ...], ...] = ()


@dataclass(frozen=True, slots=True)
class QuotaReport:
    """What an upstream said it counted in one window: at least `used` calls (fleet-wide
    counts rise to it, never fall). Sliding: those calls leave the window `expires` seconds
    from now. Day: they count in the day starting at `day_start`."""

    window: Window
    used: int
    expires: float
    day_start: float
    until_reset: float
    now: float | None = None  # as in QuotaAsk


class RateWindow:
    """At most `window.calls` calls in any span of `window.period` (a sliding log).

    A token bucket holding one period's burst lets through that burst plus a period's
    refill, up to twice the limit within one period, which a quota counting calls per
    second or per minute answers with 429. Here a call may start only once the one
    `count` calls before it is a whole period old. A reservation may lie in the future:
    later callers queue behind it, each told exactly how long to wait for its own slot.
    """

    def __init__(self, window: Window, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.count = window.calls
        self.period = window.period
        self._clock = clock
        self._starts: deque[float] = deque()  # the last `count` reserved start times, ordered

    def slot(self, now: float, count: int | None = None) -> float:
        """The earliest time at or after `now` a call could start, `count` (at least 1, at
        most the window's; default the window's) calls a period allowed."""
        starts = self._starts
        while starts and starts[0] <= now - self.period:
            starts.popleft()
        count = self.count if count is None else count
        if len(starts) < count:
            return now
        return max(now, starts[-count] + self.period)

    def take(self, slot: float) -> None:
        """Count a call starting at `slot`."""
        insort(self._starts, slot)  # a slot another window pushed back may not come last
        while len(self._starts) > self.count:
            self._starts.popleft()

    def take_many(self, slot: float, k: int) -> None:
        """Count `k` calls starting at `slot`: one splice, not k insertions."""
        if k <= 0:
            return
        starts = list(self._starts)
        at = bisect_right(starts, slot)
        starts[at:at] = [slot] * min(k, self.count)
        self._starts = deque(starts[-self.count :])

    def starts(self, now: float) -> list[float]:
        """The start times counted in the span ending now, and those queued after it."""
        self.slot(now)
        return list(self._starts)

    def used(self, now: float) -> int:
        """Calls counted in the span ending now, and those queued after it."""
        self.slot(now)
        return len(self._starts)

    def reserve(self, max_wait: float) -> float | None:
        """Seconds to wait for a slot now reserved, or None (nothing reserved) if that would
        be longer than `max_wait`."""
        now = self._clock()
        slot = self.slot(now)
        if slot - now > max_wait:
            return None
        self.take(slot)
        return slot - now

    def next_token(self) -> float:
        """Seconds until a call could start."""
        now = self._clock()
        return self.slot(now) - now


class LocalQuota:
    """One upstream's windows counted in this process: sliding ones by `clock` (monotonic),
    day ones by `wall` (the reset is a wall-clock time)."""

    def __init__(
        self,
        windows: tuple[Window, ...],
        reset: QuotaReset,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.windows = windows
        self.reset = reset
        self._clock = clock
        self._wall = wall
        self._logs = {w: RateWindow(w, clock) for w in windows if w.sliding}
        self._days: dict[float, int] = {}  # day start -> calls counted in that day
        self.changes = 0  # bumped by every change to a count (what a state file saves)

    def _day_used(self, day: float) -> int:
        for old in [d for d in self._days if d < day]:
            del self._days[old]
        return self._days.get(day, 0)

    def reserve(
        self, max_wait: float, shares: tuple[int, ...] = (), not_before: float = -math.inf
    ) -> Answer:
        """Reserve a slot in every window, or in none: the wait, or when to retry. `shares`:
        calls allowed per window (each at least 1) instead of its limit (see quotashare.py);
        `not_before`: no slot earlier than that (the clock's time)."""
        now, wall = self._clock(), self._wall()
        limits = shares or tuple(w.calls if w.sliding else int(w.count) for w in self.windows)
        pairs = zip(self.windows, limits, strict=True)
        slots = (self._logs[w].slot(now, k) for w, k in pairs if w.sliding)
        slot = max([now, not_before, *slots])
        wait = slot - now
        day, until_reset = self.reset.day_start(wall), self.reset.next_reset(wall) - wall
        for window, limit in zip(self.windows, limits, strict=True):
            if not window.sliding and self._day_used(day) >= limit:
                return Refused(until_reset, used=self.used())
        if wait > max_wait:
            return Refused(wait, used=self.used())
        if wait >= until_reset and not all(w.sliding for w in self.windows):
            # It would go in the next day, counted in this one: retry once that day began.
            return Refused(wait, used=self.used())
        self.charge(wait)
        return Admitted(wait, self.used())

    def charge(self, wait: float) -> None:
        """Count a call going in `wait` seconds, unchecked: another counter admitted it (the
        shared one), and this process keeps what it spent for when that one is gone."""
        now, wall = self._clock(), self._wall()
        for log in self._logs.values():
            log.take(now + wait)
        if not all(w.sliding for w in self.windows):
            day = self.reset.day_start(wall)
            self._days[day] = self._day_used(day) + 1
        self.changes += 1

    def raise_used(self, window: Window, used: int, expires: float | None = None) -> None:
        """Count at least `used` calls in `window` now, never fewer than already counted
        (learned from the upstream, or the unknown treated as spent). Sliding: the calls
        added leave the window `expires` seconds from now (default, and at most: a period)."""
        if window not in self.windows:
            return
        used = max(0, min(used, window.calls))
        if not window.sliding:
            day = self.reset.day_start(self._wall())
            if used > self._day_used(day):
                self._days[day] = used
                self.changes += 1
            return
        log, now = self._logs[window], self._clock()
        period = log.period
        expires = period if expires is None else max(0.0, min(expires, period))
        if (more := used - log.used(now)) > 0:
            log.take_many(now + expires - period, more)
            self.changes += 1

    def spend(self) -> None:
        """Treat every window as spent until its reset (what it counted is unknown)."""
        for window in self.windows:
            self.raise_used(window, window.calls)

    def day(self) -> tuple[float, float, int]:
        """The current day: its start, its end (the next reset), and the calls it counted."""
        wall = self._wall()
        start = self.reset.day_start(wall)
        return start, self.reset.next_reset(wall), self._day_used(start)

    def held(self, window: Window) -> list[float]:
        """A sliding window's counted call times, as wall-clock times (what a restart can
        carry over: the monotonic clock starts again)."""
        now, shift = self._clock(), self._wall() - self._clock()
        return [t + shift for t in self._logs[window].starts(now)]

    def hold(self, window: Window, starts: list[float]) -> None:
        """Count calls at these wall-clock times in a sliding window (a saved state)."""
        log, shift = self._logs[window], self._wall() - self._clock()
        for start in starts:
            log.take(start - shift)
        self.changes += 1

    def adopt(self, old: LocalQuota) -> None:
        """Count what `old` counted (a reload replaced it): per window of the same length,
        a day only when it resets at the same time. A reload may not respend a budget."""
        was = {w.label: w for w in old.windows}
        for window in self.windows:
            if (before := was.get(window.label)) is None:
                continue
            if window.sliding:
                self.hold(window, old.held(before))
            elif old.reset == self.reset:
                self.raise_used(window, old.day()[2])

    def used(self) -> tuple[int, ...]:
        """Calls counted per window, in order."""
        now, day = self._clock(), self.reset.day_start(self._wall())
        return tuple(
            self._logs[w].used(now) if w.sliding else self._day_used(day) for w in self.windows
        )
