"""The store protocols. Stores know keys and entries, nothing about HTTP or freshness.

`Store` is a tier (memory, Redis); `PagedStore` is a tier a listing can walk a page at a
time (a remote one); `Shared` is what only a store every instance shares can do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from proxy.entry import CachedResponse
from proxy.quota import Answer, QuotaAsk, QuotaReport

Layer = Literal["l1", "l2"]  # a tier's name: in-process, or shared by every instance


@dataclass(slots=True)
class StoreStats:
    """Counters every store keeps."""

    hits: int = 0
    misses: int = 0
    sets: int = 0
    deletes: int = 0
    evictions: int = 0
    expirations: int = 0
    errors: int = 0  # calls that failed (L2: refused, timed out)
    corrupt: int = 0  # stored values that did not decode (L2)


class Store(Protocol):
    """A handful of async methods; patterns are Redis-style globs over whole keys. A remote
    store raises StoreUnavailable, and nothing else, when it cannot answer."""

    @property
    def stats(self) -> StoreStats:
        """This store's counters."""
        ...

    async def get(self, key: str) -> CachedResponse | None:
        """The entry under key, or None when absent or past its keep_until."""
        ...

    async def set(self, key: str, entry: CachedResponse) -> None:
        """Store entry under key until entry.keep_until (replacing any older one)."""
        ...

    async def delete(self, key: str) -> bool:
        """Remove key; True if it was there."""
        ...

    async def delete_matching(self, pattern: str) -> int:
        """Remove every key matching the glob; the count removed."""
        ...

    async def clear(self) -> int:
        """Remove everything; the count removed."""
        ...

    def scan(self, pattern: str = "*") -> AsyncIterator[tuple[str, CachedResponse]]:
        """Live (key, entry) pairs whose key matches the glob."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class PagedStore(Store, Protocol):
    """A store too large to walk at once: a listing pages through it by cursor."""

    async def scan_page(
        self, pattern: str, cursor: int, count: int
    ) -> tuple[int, list[tuple[str, CachedResponse]]]:
        """One bounded step of a walk over live entries matching the glob (start at cursor
        0): the next cursor, 0 when done. A step may find none and the walk still go on; a
        key held throughout the walk is found at least once."""
        ...

    async def exists_many(self, keys: list[str]) -> list[bool]:
        """Which of these keys the store holds."""
        ...


class Shared(Protocol):
    """What only a store every instance shares can do: leases (who fetches a key), ban
    records, request counts, upstream quotas, and the channel the backplane listens on.
    Redis implements it; a Sentinel or Cluster store would too; a lone instance has `Solo`."""

    @property
    def reaches_others(self) -> bool:
        """Whether other instances see what goes through it (False for `Solo`)."""
        ...

    async def acquire_lease(self, key: str, owner: str, seconds: float) -> bool:
        """True if this owner now holds the right to fetch key, for `seconds` at most."""
        ...

    async def lease_held(self, key: str) -> bool:
        """Whether some instance holds the lease on key."""
        ...

    async def release_lease(self, key: str, owner: str) -> None:
        """Give the lease back, if it is still this owner's."""
        ...

    async def save_bans(self, records: Mapping[str, bytes], forget: Sequence[str]) -> None:
        """Keep ban records (subject -> encoded record) and drop the forgotten ones."""
        ...

    async def load_bans(self) -> dict[bytes, bytes]:
        """Every ban record kept."""
        ...

    async def add_popularity(self, counts: Mapping[str, int]) -> None:
        """Add request counts per key (bounded in keys and key length)."""
        ...

    async def hottest(self, n: int) -> list[tuple[str, float]]:
        """The n most requested keys, busiest first, with their counts."""
        ...

    async def publish(self, channel: str, message: bytes) -> None:
        """Send one backplane message to every instance."""
        ...

    async def reserve_quota(self, upstream: str, ask: QuotaAsk) -> Answer | None:
        """Reserve a slot in every window of the upstream's quota, counted for every instance,
        or in none (one round trip). None: not counted here, the caller counts in process."""
        ...

    async def pause_quota(self, upstream: str, seconds: float, now: float | None) -> None:
        """Pause calls to the upstream for every instance (a 429's Retry-After), unless a
        longer pause is on. `now`: as in QuotaAsk."""
        ...

    async def learn_quota(self, upstream: str, report: QuotaReport) -> None:
        """Raise one window's count, for every instance, to at least what the upstream said
        it counted (never lower it)."""
        ...
