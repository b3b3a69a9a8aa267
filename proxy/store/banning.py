"""Bans in the layered store: purges by tag, route and URL recorded as times, here, in the
shared store (which survives restarts) and on the backplane, and applied at lookup
(proxy/bans.py)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from proxy.backplane import Event
from proxy.bans import FLOOR, URL_FLOOR, entry_tags, url_subject
from proxy.errors import StoreUnavailable
from proxy.walk import SLICE, sliced

if TYPE_CHECKING:
    from proxy.store.layered import LayeredStore


class Banning:
    """The layered store's bans: record, lift, load, and count what a tag purge reaches."""

    def __init__(self, store: LayeredStore) -> None:
        self._store = store
        self._counting = asyncio.Lock()  # one tag purge's L1 walk at a time: one snapshot

    async def load(self) -> None:
        """Read the purges on record in the shared store (at start, and after a resync),
        and put right what the load refused, clamped or forgot there."""
        shared = self._store.shared
        with contextlib.suppress(StoreUnavailable):
            loaded = self._store.bans.load(await shared.load_bans())
            if loaded.rewrite or loaded.delete:
                await shared.save_bans(loaded.rewrite, loaded.delete)

    async def tag(self, tag: str, soft: bool) -> tuple[int, bool]:
        """Purge every entry carrying `tag` (symbol=AAPL, route=chart), in every layer and
        instance, lazily. Returns the L1 entries it applies to here, and whether the shared
        store (so the other instances) got it. Soft: entries stay, served only on upstream error."""
        store = self._store
        await store.flush()
        at, reached = await self._ban(tag, soft)
        return await self._apply_ban(tag, at, soft), reached

    async def url(self, resource: str) -> bool:
        """Purge every variant of one URL (`api /quote/AAPL`: key-header variants, cached
        POST bodies), lazily: one record in the shared store and one message, whatever L2
        holds. Whether the shared store (so the other instances) got it."""
        _at, reached = await self._ban(url_subject(resource), soft=False)
        return reached

    async def _ban(self, subject: str, soft: bool) -> tuple[float, bool]:
        """Record a ban here, in the shared store and (by message) on every instance: when,
        and whether the shared store got it."""
        store = self._store
        now = store.clock()
        recorded = store.bans.add(subject, now, soft)
        assert recorded is not None  # our own clock's time
        store.invalidated()
        records = {subject: store.bans.encode(subject)}
        forgotten = set(recorded.forgotten)
        for floor in (FLOOR, URL_FLOOR) if forgotten else ():  # the floors may have moved
            if store.bans.holds(floor):
                records[floor] = store.bans.encode(floor)
            else:
                forgotten.add(floor)
        reached = await self._save(records, tuple(forgotten - set(records)))
        await store.publish(Event("softban" if soft else "ban", subject, store.instance, now))
        return recorded.at, reached

    async def lift(self, subject: str) -> tuple[bool, bool]:
        """Lift a ban here, in the shared store and (by message) on every instance: whether
        there was one here, and whether the shared store got it."""
        store = self._store
        lifted = store.bans.lift(subject)
        reached = await self._save({}, (subject,))
        await store.publish(Event("unban", subject, store.instance, store.clock()))
        return lifted, reached

    async def _save(self, records: dict[str, bytes], forget: tuple[str, ...]) -> bool:
        """Keep records in the shared store: whether it got them (never, alone)."""
        shared = self._store.shared
        try:
            await shared.save_bans(records, forget)
        except StoreUnavailable:
            return False
        return shared.reaches_others

    async def _apply_ban(self, tag: str, at: float, soft: bool) -> int:
        """For the answer to an admin's tag purge: the L1 entries stored before `at` that
        carry the tag, dropped (hard) or left for lookup to mark (soft). Lookups apply the
        ban anyway; this walk is only for the count (and frees memory early), so it runs
        once per admin request, never per backplane message or URL ban, one at a time, and
        lets the event loop run every few milliseconds."""
        store = self._store
        if store.l1 is None:
            return 0
        applied = 0
        async with self._counting:
            # A snapshot: the dict may change meanwhile.
            async for key, entry in sliced(store.l1.items(), SLICE):
                if entry.stored_at < at and tag in entry_tags(entry):
                    applied += 1
                    if not soft:
                        store.l1.drop(key, older_than=at)  # a copy stored since stays
        return applied
