"""Which instances are alive: each announces itself on the backplane every `every` seconds,
and each keeps a bounded map of the others it heard from (issue 13 item 3).

The count is what an instance divides its quota windows by while Redis cannot be reached,
so it must be the count it last knew: while the backplane is not subscribed nobody can be
heard, and time stops for the map (instances expire in time spent listening, not in wall
time). Announcements come from Redis, so anyone who can PUBLISH chooses them: the map is
bounded, and a flood can only make the count larger, which makes every share smaller.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Final

from proxy.backplane import Event

ANNOUNCE_EVERY: Final = 2.0  # seconds between two announcements of one instance
EXPIRE_AFTER: Final = 3  # announcements missed before an instance counts as gone
MAX_INSTANCES: Final = 256  # instances remembered (a bound on what a publisher makes us keep)


class Fleet:
    """The live instances this one knows of, itself included; a fleet of one until it hears
    from others. `clock` is monotonic (tests pass theirs)."""

    def __init__(
        self,
        instance: str,
        every: float = ANNOUNCE_EVERY,
        clock: Callable[[], float] = time.monotonic,
        limit: int = MAX_INSTANCES,
    ) -> None:
        self.instance = instance
        self.every = every
        self.expire = every * EXPIRE_AFTER
        self._clock = clock
        self._limit = limit
        self._seen: dict[str, float] = {}  # instance -> last heard, in listening time
        self._deaf_since: float | None = None  # the backplane lost its subscription then
        self._deaf_for = 0.0  # listening time lags the clock by the time spent deaf

    def _listening_time(self) -> float:
        now = self._deaf_since if self._deaf_since is not None else self._clock()
        return now - self._deaf_for

    def heard(self, event: Event) -> None:
        """Another instance announced itself (its id is the event's origin)."""
        if event.op != "alive" or event.origin == self.instance:
            return
        now = self._listening_time()
        self._seen.pop(event.origin, None)  # re-inserted last: the dict stays oldest-first
        self._forget(now)
        if len(self._seen) < self._limit:
            self._seen[event.origin] = now

    def connected(self, up: bool) -> None:
        """The backplane subscribed (True) or lost its subscription (False)."""
        now = self._clock()
        if not up and self._deaf_since is None:
            self._deaf_since = now
        elif up and self._deaf_since is not None:
            self._deaf_for += now - self._deaf_since
            self._deaf_since = None

    def _forget(self, now: float) -> None:
        for name in [n for n, seen in self._seen.items() if seen <= now - self.expire]:
            del self._seen[name]

    def live(self) -> int:
        """Instances alive as last known, this one included."""
        self._forget(self._listening_time())
        return 1 + len(self._seen)

    def alive(self) -> Event:
        """This instance's announcement."""
        return Event("alive", "", self.instance)

    async def announce(self, publish: Callable[[Event], Awaitable[None]]) -> None:
        """Announce this instance every `every` seconds, forever (a background task)."""
        while True:
            await publish(self.alive())  # the store's publish: a failure is not raised
            await asyncio.sleep(self.every)
