"""Popularity through the layered store: requests counted in this process, flushed to the
shared store in batches, and read back as the hottest keys (for `/hottest` and warm start).
An instance alone keeps its counts here for good, aging them."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from proxy.errors import StoreUnavailable
from proxy.popularity import Popularity

if TYPE_CHECKING:
    from proxy.store.layered import LayeredStore

_POPULAR_BATCH = 1000  # keys per popularity flush


class Popular:
    """The layered store's request counts per key: shared, or (alone) kept here."""

    def __init__(self, store: LayeredStore, flush_every: float) -> None:
        self._store = store
        # Nothing shared to flush to: the counts are kept here, and must age here.
        self._here = not store.shared.reaches_others
        # Requests per key: since the last flush, or (kept here) for good.
        self._counts = Popularity(aging=self._here)
        # Flushed never (0), counting would only fill memory.
        self._counting = self._here or flush_every > 0

    def count(self, key: str) -> None:
        """Count a request toward key's popularity: in-process (bounded), flushed to the
        shared store periodically, or kept here. Callers count only requests answered with
        a stored entry, never upstream errors."""
        if self._counting:
            self._counts.count(key)

    async def flush(self) -> None:
        """Send the counts gathered since the last flush to the shared store, in one round
        trip."""
        if self._here or not self._counts:
            return
        # A bounded batch: the busiest keys, which are the ones warm-up will want.
        batch = self._counts.take(_POPULAR_BATCH)
        with contextlib.suppress(StoreUnavailable):  # those counts are lost: they are hints
            await self._store.shared.add_popularity(batch)

    async def run(self, every: float) -> None:
        """Flush popularity counts every `every` seconds, forever."""
        while True:
            await asyncio.sleep(every)
            await self.flush()

    async def hottest(self, n: int) -> list[tuple[str, float]]:
        """The most requested keys: the shared counts, or this instance's alone."""
        if self._here:
            return [(key, float(count)) for key, count in self._counts.most_common(n)]
        try:
            return await self._store.shared.hottest(n)
        except StoreUnavailable:
            return []
