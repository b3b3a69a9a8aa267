"""Cross-instance coalescing: one instance fetches a key (it holds the key's lease in the
shared store), the others wait for its answer to land in L2 instead of fetching it too."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from proxy.errors import StoreUnavailable

if TYPE_CHECKING:
    from proxy.store.layered import Found, LayeredStore

_POLL = 0.05  # fallback poll while waiting for another instance's fetch to land in L2
_RECENT = 1.0  # seconds: after a failed L2 read, a lease is not even tried


class Leases:
    """The layered store's leases: who fetches a key, and waiting for another's fetch."""

    def __init__(self, store: LayeredStore) -> None:
        self._store = store
        self._watchers: dict[str, asyncio.Event] = {}
        self._last_failure = -1e9  # monotonic time of the last failed L2 read

    def read_failed(self) -> None:
        """An L2 read failed just now (see `_RECENT`)."""
        self._last_failure = time.monotonic()

    @property
    def shared(self) -> bool:
        """Whether other instances take leases too; if not, every lease is granted and no
        one needs to ask for it."""
        return self._store.shared.reaches_others

    def wake(self, key: str) -> None:
        """Another instance stored key: whoever waits for it looks in L2 at once."""
        if (watcher := self._watchers.get(key)) is not None:
            watcher.set()

    async def acquire(self, key: str, seconds: float) -> bool:
        """True if this instance should fetch key (it holds the lease, or L2 is unusable)."""
        if time.monotonic() - self._last_failure < _RECENT:
            return True  # L2 just failed this key's read: do not spend a second timeout
        try:
            return await self._store.shared.acquire_lease(key, self._store.instance, seconds)
        except StoreUnavailable:
            return True

    def release(self, key: str) -> None:
        """Give the lease back once key's L2 write has landed, so no other instance takes
        the lease and fetches again in between (if the release fails, the lease expires)."""
        store = self._store
        store.tasks.spawn(self._release(key, store.write_in_flight(key)), "l2-lease-release")

    async def _release(self, key: str, write: asyncio.Task[None] | None) -> None:
        if write is not None:
            await asyncio.wait([write])
        with contextlib.suppress(StoreUnavailable):  # then it expires
            await self._store.shared.release_lease(key, self._store.instance)

    async def wait_for_l2(self, key: str, seconds: float, newer_than: float) -> Found | None:
        """Wait up to `seconds` for another instance's fetch of key to appear in L2: an entry
        stored after `newer_than` and still fresh (not the stale copy we already have).

        Woken by that instance's backplane "set" event; polls as well, so a lost message
        costs at most one poll interval. Stops early when the lease is gone with no value
        (the fetch failed or was not storable): then the caller fetches itself.
        """
        watcher = self._watchers.setdefault(key, asyncio.Event())
        deadline = asyncio.get_running_loop().time() + seconds
        try:
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                if (found := await self.fetched_since(key, newer_than)) is not None:
                    return found
                try:  # refused at once while the breaker is open
                    if not await self._store.shared.lease_held(key):
                        return None
                except StoreUnavailable:
                    return None
                watcher.clear()
                try:
                    async with asyncio.timeout(min(_POLL, left)):
                        await watcher.wait()
                except TimeoutError:
                    pass
            return None
        finally:
            self._watchers.pop(key, None)

    async def fetched_since(self, key: str, newer_than: float) -> Found | None:
        """Key's L2 entry if it was stored after `newer_than` and is still fresh: what another
        instance fetched (not the stale copy we already have, nor what a purge removed)."""
        store = self._store
        found = await store.lookup_remote(key)
        if (
            found is not None
            and found.entry.stored_at > newer_than
            and found.entry.expires_at > store.clock()
            and store.bans.verdict(found.entry, key) is None
        ):
            return found
        return None
