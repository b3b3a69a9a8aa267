"""A remote store behind its circuit breaker: while the breaker is open, every call fails at
once with StoreUnavailable; each failure or success is fed to it. Everyone reaching a remote
store (the layered store, listing, admin) goes through here, so none of them gets past a
breaker that has given up on Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

from proxy.breaker import CircuitBreaker
from proxy.entry import CachedResponse
from proxy.errors import StoreUnavailable
from proxy.quota import Answer, QuotaAsk, QuotaReport
from proxy.store.base import Layer, PagedStore, Shared, StoreStats

T = TypeVar("T")


async def _through(breaker: CircuitBreaker, call: Callable[[], Awaitable[T]]) -> T:
    """Run one call if the breaker allows it, and tell the breaker how it went."""
    if not breaker.allow():
        raise StoreUnavailable(f"circuit open: {breaker.reason}")
    try:
        result = await call()
    except StoreUnavailable as e:
        breaker.failure(str(e))
        raise
    breaker.success()
    return result


class Guarded:
    """A remote tier (a `PagedStore`) named `name`, behind `breaker`."""

    def __init__(self, tier: PagedStore, breaker: CircuitBreaker, name: Layer = "l2") -> None:
        self._tier = tier
        self.breaker = breaker
        self.name: Layer = name

    @property
    def stats(self) -> StoreStats:
        """The tier's own counters."""
        return self._tier.stats

    async def get(self, key: str) -> CachedResponse | None:
        """The entry under key, or None."""
        return await _through(self.breaker, lambda: self._tier.get(key))

    async def set(self, key: str, entry: CachedResponse) -> None:
        """Store entry under key."""
        await _through(self.breaker, lambda: self._tier.set(key, entry))

    async def delete(self, key: str) -> bool:
        """Remove key; True if it was there."""
        return await _through(self.breaker, lambda: self._tier.delete(key))

    async def delete_matching(self, pattern: str) -> int:
        """Remove every key matching the glob."""
        return await _through(self.breaker, lambda: self._tier.delete_matching(pattern))

    async def clear(self) -> int:
        """Remove everything."""
        return await _through(self.breaker, self._tier.clear)

    async def scan(self, pattern: str = "*") -> AsyncIterator[tuple[str, CachedResponse]]:
        """Live entries matching the glob: refused while the breaker is open and no probe is
        due, but never the probe itself (a walk is too long a call to judge Redis by): it
        neither takes a probe's turn nor closes the breaker."""
        if self.breaker.is_open:
            raise StoreUnavailable(f"circuit open: {self.breaker.reason}")
        try:
            async for item in self._tier.scan(pattern):
                yield item
        except StoreUnavailable as e:
            self.breaker.failure(str(e))
            raise

    async def scan_page(
        self, pattern: str, cursor: int, count: int
    ) -> tuple[int, list[tuple[str, CachedResponse]]]:
        """One step of a walk over live entries matching the glob."""
        return await _through(self.breaker, lambda: self._tier.scan_page(pattern, cursor, count))

    async def exists_many(self, keys: list[str]) -> list[bool]:
        """Which of these keys the tier holds."""
        return await _through(self.breaker, lambda: self._tier.exists_many(keys))

    async def close(self) -> None:
        """Close the tier (never refused)."""
        await self._tier.close()


class GuardedShared:
    """A `Shared` behind a breaker: the one of the remote tier it lives in, usually."""

    def __init__(self, shared: Shared, breaker: CircuitBreaker) -> None:
        self._shared = shared
        self.breaker = breaker

    @property
    def reaches_others(self) -> bool:
        """Whether other instances see what goes through it."""
        return self._shared.reaches_others

    async def acquire_lease(self, key: str, owner: str, seconds: float) -> bool:
        """True if this owner now holds key's lease."""
        return await _through(self.breaker, lambda: self._shared.acquire_lease(key, owner, seconds))

    async def lease_held(self, key: str) -> bool:
        """Whether some instance holds key's lease."""
        return await _through(self.breaker, lambda: self._shared.lease_held(key))

    async def release_lease(self, key: str, owner: str) -> None:
        """Give the lease back, if it is still this owner's."""
        await _through(self.breaker, lambda: self._shared.release_lease(key, owner))

    async def save_bans(self, records: Mapping[str, bytes], forget: Sequence[str]) -> None:
        """Keep ban records and drop the forgotten ones."""
        await _through(self.breaker, lambda: self._shared.save_bans(records, forget))

    async def load_bans(self) -> dict[bytes, bytes]:
        """Every ban record kept."""
        return await _through(self.breaker, self._shared.load_bans)

    async def add_popularity(self, counts: Mapping[str, int]) -> None:
        """Add request counts per key."""
        await _through(self.breaker, lambda: self._shared.add_popularity(counts))

    async def hottest(self, n: int) -> list[tuple[str, float]]:
        """The n most requested keys."""
        return await _through(self.breaker, lambda: self._shared.hottest(n))

    async def publish(self, channel: str, message: bytes) -> None:
        """Send one backplane message."""
        await _through(self.breaker, lambda: self._shared.publish(channel, message))

    async def reserve_quota(self, upstream: str, ask: QuotaAsk) -> Answer | None:
        """Reserve a slot in every window of the upstream's shared quota, or in none."""
        return await _through(self.breaker, lambda: self._shared.reserve_quota(upstream, ask))

    async def pause_quota(self, upstream: str, seconds: float, now: float | None) -> None:
        """Pause the upstream for every instance."""
        await _through(self.breaker, lambda: self._shared.pause_quota(upstream, seconds, now))

    async def learn_quota(self, upstream: str, report: QuotaReport) -> None:
        """Raise a window's fleet-wide count to what the upstream reported."""
        await _through(self.breaker, lambda: self._shared.learn_quota(upstream, report))
