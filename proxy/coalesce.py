"""Single flight: concurrent misses for one key share one upstream request."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from proxy.entry import CachedResponse
from proxy.errors import UpstreamError

# What a leader hands its waiters: the response, the upstream failure, or None
# ("fetch it yourself": the response was private, streamed, or the leader gave up).
Shared = CachedResponse | UpstreamError | None


class Flight:
    """The leader's handle: set `result` before leaving the `lead` block."""

    __slots__ = ("result",)

    def __init__(self) -> None:
        self.result: Shared = None


class Coalescer:
    """Tracks in-flight fetches by cache key within this process."""

    def __init__(self) -> None:
        self._flights: dict[str, asyncio.Future[Shared]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def in_flight(self, key: str) -> asyncio.Future[Shared] | None:
        """The running fetch for key, if any."""
        return self._flights.get(key)

    @contextmanager
    def lead(self, key: str) -> Iterator[Flight]:
        """Register as the one fetcher for key; waiters get flight.result when this exits,
        however it exits (a cancelled leader releases its waiters with None)."""
        future: asyncio.Future[Shared] = asyncio.get_running_loop().create_future()
        self._flights[key] = future
        flight = Flight()
        try:
            yield flight
        finally:
            if self._flights.get(key) is future:
                del self._flights[key]
            future.set_result(flight.result)

    @staticmethod
    async def wait(future: asyncio.Future[Shared], seconds: float) -> Shared:
        """The leader's result, or None after `seconds` (then the waiter fetches itself)."""
        try:
            async with asyncio.timeout(seconds):
                return await asyncio.shield(future)
        except TimeoutError:
            return None
