"""Popularity through the layered store: requests counted in this process, flushed to L2
in batches, and read back as the hottest keys (for `/hottest` and warm start)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from proxy.errors import StoreUnavailable
from proxy.popularity import Popularity

if TYPE_CHECKING:
    from proxy.store.layered import LayeredStore

_POPULAR_BATCH = 1000  # keys per popularity flush


class Popular:
    """The layered store's request counts per key: shared through L2, else kept here."""

    def __init__(self, store: LayeredStore) -> None:
        self._store = store
        # Requests per key: since the last flush, or (without an L2) for good, aging.
        self._counts = Popularity(aging=store.l2 is None)

    def count(self, key: str) -> None:
        """Count a request toward key's popularity: in-process (bounded), flushed to L2
        periodically; without an L2 the counts stay here. Callers count only requests
        answered with a stored entry, never upstream errors."""
        l2 = self._store.l2
        if l2 is None or l2.config.popularity_flush > 0:
            self._counts.count(key)

    async def flush(self) -> None:
        """Send the counts gathered since the last flush to L2, in one round trip."""
        if self._store.l2 is None or not self._counts:
            return
        # A bounded batch: the busiest keys, which are the ones warm-up will want.
        batch = self._counts.take(_POPULAR_BATCH)
        await self._store.quietly(lambda l2: l2.add_popularity(batch))

    async def run(self, every: float) -> None:
        """Flush popularity counts every `every` seconds, forever."""
        while True:
            await asyncio.sleep(every)
            await self.flush()

    async def hottest(self, n: int) -> list[tuple[str, float]]:
        """The most requested keys: L2's counts, or this instance's without an L2."""
        if self._store.l2 is None:
            return [(key, float(count)) for key, count in self._counts.most_common(n)]
        try:
            return await self._store.call_l2(lambda l2: l2.hottest(n))
        except StoreUnavailable:
            return []
