"""The one store protocol. Stores know keys and entries, nothing about HTTP or freshness."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from proxy.entry import CachedResponse


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
    """A handful of async methods; patterns are Redis-style globs over whole keys."""

    stats: StoreStats

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
