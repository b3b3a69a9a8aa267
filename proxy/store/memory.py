"""L1: an in-process LRU bounded by entry count and by bytes, with lazy expiry."""

from __future__ import annotations

import asyncio
import sys
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine, KeysView
from dataclasses import dataclass, field
from typing import Final

from proxy.clock import Clock, system_clock
from proxy.entry import ENTRY_OVERHEAD, CachedResponse
from proxy.glob import Glob
from proxy.store.base import StoreStats
from proxy.walk import SLICE, sliced


def _block(size: int) -> int:
    """What CPython's small-object allocator takes for `size` bytes: whole 16-byte blocks."""
    return -(-size // 16) * 16


# What an entry costs beyond its body and header text: the Python objects holding them.
# For a quote-sized entry (200 B body, 7 headers) they come to ~1.5 KB, where entry.size's flat
# ENTRY_OVERHEAD allows 200 B, so 1M small entries under a 200 MB limit grew the resident set
# by ~3x the limit (bench/memory.py). The sizes are sys.getsizeof of the real object kinds,
# rounded to allocator blocks; tests/test_store_memory.py checks the sum against tracemalloc
# for entries made from real aiohttp responses.
_STR: Final = sys.getsizeof("")  # a str's header (49 B on CPython 3.11); its text is extra
_ROUND: Final = 8  # a variable-sized object wastes half a 16-byte block on average
_SLOT: Final = 80  # OrderedDict slot: table entry, index, linked-list node (66-91 B measured)
# The head an entry serializes on its first hit and keeps (entry.wire(), wire.py): a small
# object and one bytes object holding the header text again (entry.size counts it twice),
# the status line and Content-Length (~40 B).
_WIRE: Final = 48 + sys.getsizeof(b"") + _ROUND + 40
_FIXED: Final = (
    _block(sys.getsizeof(CachedResponse(0, (), b"", 0.0, 0.0)))
    + 2 * (sys.getsizeof(()) + _ROUND)  # the headers and tags tuples
    + sys.getsizeof(b"") + _ROUND  # the body's bytes object
    + _STR + _ROUND  # the key
    + 3 * _block(sys.getsizeof(0.0))  # stored_at, ttl, initial_age: computed per response
    + _SLOT
    + _WIRE
)  # fmt: skip
# A header: its (name, value) tuple, its pointer in the headers tuple and the value's str
# header. Not the name: aiohttp's parser hands out one shared object per header name.
_PER_HEADER: Final = _block(sys.getsizeof(("", ""))) + 8 + _STR + _ROUND
_PER_TAG: Final = 8 + _STR + _ROUND  # pointer and str header; the text is added per tag
# Pattern purges walking L1 at once, at most: each holds a copy of L1's index, and every
# lookup meanwhile matches its key against each one's glob. Unbounded, 200 purge messages
# over 50k entries held the loop for 4.4 s and 368 MB (issue 11 review, finding 6).
MAX_SWEEPS: Final = 4


def cost(key: str, entry: CachedResponse) -> int:
    """Bytes an entry under key holds in this process: entry.size (body and header text),
    with its flat allowance replaced by the objects around them. The L1 byte limit bounds
    this, so that it bounds resident memory, not just payload."""
    return (
        entry.size
        - ENTRY_OVERHEAD
        + _FIXED
        + _PER_HEADER * len(entry.headers)
        + _PER_TAG * len(entry.tags)
        + sum(map(len, entry.tags))
        + len(key)
    )


@dataclass(slots=True)
class _Sweep:
    """A pattern purge walking L1: its glob, the entries held when it was asked for, and how
    many of them it has removed (by its walk, or at their lookup meanwhile).

    Each key is matched once per sweep, by its walk or a lookup, whichever comes first: a
    match removes the entry, a miss is remembered in `spared`. Matched at every lookup, a hit
    on an 8 KB key cost 63 ms with four dense globs walking (issue 11 second review, #2)."""

    glob: Glob
    held: dict[str, CachedResponse]
    removed: int = 0
    spared: set[str] = field(default_factory=set)

    def dooms(self, key: str) -> bool:
        """Whether the glob matches key, asked at most once per key."""
        if key in self.spared:
            return False
        if self.glob.matches(key):
            return True
        self.spared.add(key)
        return False


class MemoryStore:
    """LRU over an OrderedDict. Expired entries go when touched or when evicted."""

    def __init__(self, max_entries: int, max_bytes: int, clock: Clock = system_clock) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self.stats = StoreStats()
        self._clock = clock
        self._entries: OrderedDict[str, CachedResponse] = OrderedDict()
        # Pattern purges still walking L1: a lookup meanwhile treats an entry one of them
        # doomed as already gone.
        self._sweeps: list[_Sweep] = []
        self._waiting = 0  # purges waiting for a walk to end, first in line for its place
        self._walk_ended = asyncio.Condition()

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
        if self._sweeps and self._swept(key, entry):
            self._remove(key)
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
        size = cost(key, entry)
        if key in self._entries:
            self._remove(key)  # the older response must not outlive a newer one
        if size > self.max_bytes:
            return  # would evict everything and still not fit
        self._entries[key] = entry
        self.bytes += size
        self.stats.sets += 1
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            old, evicted = self._entries.popitem(last=False)
            self.bytes -= cost(old, evicted)
            self.stats.evictions += 1

    async def delete(self, key: str) -> bool:
        """Remove key; True if it was there."""
        if key not in self._entries:
            return False
        self._remove(key)
        self.stats.deletes += 1
        return True

    async def delete_matching(self, pattern: str) -> int:
        """Remove every key matching the glob: once fewer than MAX_SWEEPS walks are under
        way, sweep, and wait for the walk."""
        glob = Glob.parse(pattern, max_length=None)  # bounded upstream
        self._waiting += 1
        try:
            async with self._walk_ended:
                await self._walk_ended.wait_for(lambda: len(self._sweeps) < MAX_SWEEPS)
        finally:
            self._waiting -= 1
        removed = await self._start(glob, SLICE)  # nothing ran since the wait: a place is free
        self.stats.deletes += removed
        return removed

    def sweep(self, glob: Glob, slice_seconds: float = SLICE) -> Coroutine[None, None, int] | None:
        """Forget every entry held now whose key the glob matches. From this call on, lookups
        miss those entries (an entry stored later under such a key stays); the walk that
        removes them is the coroutine returned (await or spawn it: it resolves to how many
        it removed), and lets the event loop run every `slice_seconds`.

        None, and nothing forgotten, when MAX_SWEEPS walks are under way or a purge waits
        for one to end: the caller does without (delete_matching waits instead)."""
        if len(self._sweeps) + self._waiting >= MAX_SWEEPS:
            return None
        return self._start(glob, slice_seconds)

    def _start(self, glob: Glob, slice_seconds: float) -> Coroutine[None, None, int]:
        sweep = _Sweep(glob, dict(self._entries))  # a copy of pointers: cheap beside matching
        self._sweeps.append(sweep)
        return self._walk(sweep, slice_seconds)

    async def _walk(self, sweep: _Sweep, slice_seconds: float) -> int:
        try:
            async for key, held in sliced(sweep.held.items(), slice_seconds):
                if self._entries.get(key) is held and sweep.dooms(key):
                    self._remove(key)
                    sweep.removed += 1
        finally:
            self._sweeps.remove(sweep)
            async with self._walk_ended:
                self._walk_ended.notify_all()
        return sweep.removed

    def _swept(self, key: str, entry: CachedResponse) -> bool:
        """Whether a pattern purge still walking L1 has doomed this entry (it counts it)."""
        for sweep in self._sweeps:
            if sweep.held.get(key) is entry and sweep.dooms(key):
                sweep.removed += 1
                return True
        return False

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

    def live_items(self) -> dict[str, CachedResponse]:
        """Every key with its entry, not yet past keep_until (a snapshot)."""
        now = self._clock()
        return {k: e for k, e in self._entries.items() if e.keep_until > now}

    def keys(self) -> KeysView[str]:
        """Every key held, expired or not (a live view)."""
        return self._entries.keys()

    def items(self) -> list[tuple[str, CachedResponse]]:
        """Every (key, entry) held, expired or not (a snapshot)."""
        return list(self._entries.items())

    def drop_all(self) -> None:
        """Forget everything."""
        self._entries.clear()
        self.bytes = 0

    async def scan(self, pattern: str = "*") -> AsyncIterator[tuple[str, CachedResponse]]:
        """Live entries whose key matches, least recently used first."""
        glob = Glob.parse(pattern, max_length=None)
        now = self._clock()
        async for key, entry in sliced(list(self._entries.items())):
            if entry.keep_until > now and glob.matches(key):
                yield key, entry

    async def close(self) -> None:
        """Nothing to release."""

    def _remove(self, key: str) -> None:
        self.bytes -= cost(key, self._entries.pop(key))
