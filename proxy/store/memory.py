"""L1: an in-process LRU bounded by entry count and by bytes, with lazy expiry."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import AsyncIterator

from proxy.clock import Clock, system_clock
from proxy.entry import CachedResponse
from proxy.keys import glob_to_regex
from proxy.store.base import StoreStats


class MemoryStore:
    """LRU over an OrderedDict. Expired entries go when touched or when evicted."""

    def __init__(self, max_entries: int, max_bytes: int, clock: Clock = system_clock) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self.stats = StoreStats()
        self._clock = clock
        self._entries: OrderedDict[str, CachedResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def peek(self, key: str) -> CachedResponse | None:
        """Synchronous get, for the hit path: counts, refreshes recency, expires lazily."""
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        if entry.keep_until <= self._clock():
            self._remove(key)
            self.stats.expirations += 1
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry

    async def get(self, key: str) -> CachedResponse | None:
        """The live entry under key, or None."""
        return self.peek(key)

    async def set(self, key: str, entry: CachedResponse) -> None:
        """Insert or replace, then evict least-recently-used entries until within bounds."""
        size = entry.size
        if key in self._entries:
            self._remove(key)  # the older response must not outlive a newer one
        if size > self.max_bytes:
            return  # would evict everything and still not fit
        self._entries[key] = entry
        self.bytes += size
        self.stats.sets += 1
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.size
            self.stats.evictions += 1

    async def delete(self, key: str) -> bool:
        """Remove key; True if it was there."""
        if key not in self._entries:
            return False
        self._remove(key)
        self.stats.deletes += 1
        return True

    async def delete_matching(self, pattern: str) -> int:
        """Remove every key matching the glob."""
        regex = glob_to_regex(pattern)
        doomed = [key for key in self._entries if regex.fullmatch(key)]
        for key in doomed:
            self._remove(key)
        self.stats.deletes += len(doomed)
        return len(doomed)

    async def clear(self) -> int:
        """Remove everything."""
        count = len(self._entries)
        self._entries.clear()
        self.bytes = 0
        self.stats.deletes += count
        return count

    def drop(self, key: str, older_than: float | None = None) -> None:
        """Forget key without counting a delete (another instance changed it); with
        `older_than`, only if our copy was stored before that time."""
        entry = self._entries.get(key)
        if entry is not None and (older_than is None or entry.stored_at < older_than):
            self._remove(key)

    def drop_matching(self, regex: re.Pattern[str]) -> None:
        """Forget every key the compiled glob matches."""
        for key in [k for k in self._entries if regex.fullmatch(k)]:
            self._remove(key)

    def live_items(self) -> dict[str, CachedResponse]:
        """Every key with its entry, not yet past keep_until (a snapshot)."""
        now = self._clock()
        return {k: e for k, e in self._entries.items() if e.keep_until > now}

    def items(self) -> list[tuple[str, CachedResponse]]:
        """Every (key, entry) held, expired or not (a snapshot)."""
        return list(self._entries.items())

    def drop_all(self) -> None:
        """Forget everything."""
        self._entries.clear()
        self.bytes = 0

    async def scan(self, pattern: str = "*") -> AsyncIterator[tuple[str, CachedResponse]]:
        """Live entries whose key matches, least recently used first."""
        regex = glob_to_regex(pattern)
        now = self._clock()
        for key, entry in list(self._entries.items()):
            if entry.keep_until > now and regex.fullmatch(key):
                yield key, entry

    async def close(self) -> None:
        """Nothing to release."""

    def _remove(self, key: str) -> None:
        self.bytes -= self._entries.pop(key).size
