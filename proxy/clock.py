"""Wall-clock time as a dependency, so tests move time instead of sleeping."""

from __future__ import annotations

import time
from typing import Final, Protocol

# How far apart instances' wall clocks may be (NTP keeps them far closer): a time another
# instance or Redis gives us may lie this far ahead of ours, and no further.
CLOCK_SKEW: Final = 60.0


class Clock(Protocol):
    """Anything that tells wall-clock seconds."""

    def __call__(self) -> float: ...


def system_clock() -> float:
    """Seconds since the epoch, from the operating system."""
    return time.time()


class ManualClock:
    """A clock that moves only when told to (tests, simulations)."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.now += seconds
