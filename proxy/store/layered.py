"""L1 in front of L2, behind a circuit breaker, kept coherent by the backplane.

Knows keys and entries, nothing about HTTP. Redis trouble never escapes: it is counted,
fed to the breaker, and turned into a miss (cashews' SafeRedis, FusionCache's breaker).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from proxy.backplane import CHANNEL, Event
from proxy.bans import FLOOR, URL_FLOOR, Bans, entry_tags, url_subject, valid_subject
from proxy.breaker import CircuitBreaker
from proxy.clock import Clock, system_clock
from proxy.entry import CachedResponse
from proxy.errors import StoreUnavailable
from proxy.glob import MAX_EVENT_LENGTH, Glob
from proxy.store.base import StoreStats
from proxy.store.leases import Leases
from proxy.store.memory import SWEEP_SLICE, MemoryStore
from proxy.store.popular import Popular
from proxy.store.redis import RedisStore
from proxy.tasks import Tasks

T = TypeVar("T")
log = logging.getLogger(__name__)
Layer = Literal["l1", "l2"]


@dataclass(frozen=True, slots=True)
class Found:
    """A live entry and the layer it came from."""

    entry: CachedResponse
    layer: Layer
    soft_purged: bool = False  # a soft purge since it was stored: serve only on upstream error


class LayeredStore:
    """Reads L1 then L2 (an L2 hit fills L1); writes both, L2 in the background."""

    def __init__(
        self,
        l1: MemoryStore | None,
        l2: RedisStore | None,
        breaker: CircuitBreaker,
        tasks: Tasks,
        instance: str,
        clock: Clock = system_clock,
        bans: Bans | None = None,
    ) -> None:
        if l1 is None and l2 is None:
            raise ValueError("a layered store needs at least one layer")
        self.l1 = l1
        self.l2 = l2
        self.breaker = breaker
        self.instance = instance
        self.stats = StoreStats()  # lookups through both layers
        self.tasks = tasks
        self.clock = clock
        self._writes: dict[str, asyncio.Task[None]] = {}  # L2 writes in flight, by key
        self._generation = 0  # bumped by every invalidation of L1
        self.bans = bans or Bans(clock=clock)  # purges by tag, route and URL, applied at lookup
        # L1 keys held when the backplane was lost: they may have missed a purge, so they
        # are not hits until L2 vouches for them or they are fetched again (see resync).
        self._suspect: set[str] = set()
        self._counting = asyncio.Lock()  # one tag purge's L1 walk at a time: one snapshot
        self.leases = Leases(self)  # cross-instance coalescing
        self.popularity = Popular(self)  # requests per key, for /hottest and warm start

    # --- reads -------------------------------------------------------------------------

    async def lookup(self, key: str) -> Found | None:
        """The live entry under key and where it was found (tag purges applied)."""
        found: Found | None = None
        entry = self.l1.peek(key) if self.l1 is not None else None
        if entry is not None and not (self._suspect and key in self._suspect):
            found = Found(entry, "l1")
        else:
            found = await self.lookup_l2(key)
            if found is None and entry is not None:
                # L2 no longer has it (a purge we missed, or Redis lost it): our copy may
                # only stand in if the upstream fails, as a soft-purged entry does.
                found = Found(entry, "l1", soft_purged=True)
        if found is not None and (ban := self.bans.verdict(found.entry, key)) is not None:
            if ban == "hard":
                if self.l1 is not None:
                    self.l1.drop(key)
                found = None
            else:
                found = Found(found.entry, found.layer, soft_purged=True)
        if found is None:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
        return found

    async def lookup_l2(self, key: str) -> Found | None:
        """Key's entry in L2 (a hit fills L1), bans not applied; None on a miss or error."""
        generation = self._generation
        try:
            entry = await self.call_l2(lambda l2: l2.get(key))
        except StoreUnavailable:
            self.leases.read_failed()
            return None
        if entry is None:
            return None
        # A purge that arrived while we read must not be undone by filling L1 with the
        # value it removed: fill only if nothing was invalidated meanwhile.
        if self.l1 is not None and generation == self._generation:
            await self.l1.set(key, entry)  # keeps its own expiry: the remaining lifetime
            self._trust(key)
        return Found(entry, "l2")

    def _trust(self, key: str) -> None:
        """Key's L1 copy is vouched for (by L2, or fetched anew): a hit again."""
        if self._suspect:
            self._suspect.discard(key)
            if not self._suspect:
                self._suspect = set()  # a set never shrinks: let the large one go

    async def get(self, key: str) -> CachedResponse | None:
        """Store protocol: the live entry under key."""
        found = await self.lookup(key)
        return found.entry if found else None

    async def call_l2(self, call: Callable[[RedisStore], Awaitable[T]]) -> T:
        """Run one L2 operation through the breaker; StoreUnavailable if it cannot run."""
        if self.l2 is None:
            raise StoreUnavailable("no L2 configured")
        if not self.breaker.allow():
            raise StoreUnavailable(f"L2 circuit open: {self.breaker.reason}")
        try:
            result = await call(self.l2)
        except StoreUnavailable as e:
            self.breaker.failure(str(e))
            raise
        self.breaker.success()
        return result

    # --- writes ------------------------------------------------------------------------

    async def set(self, key: str, entry: CachedResponse) -> None:
        """Write L1 now and L2 in the background: a slow L2 never delays the response."""
        if self.l1 is not None:
            await self.l1.set(key, entry)
            self._trust(key)
        if self.l2 is not None:
            self._writes[key] = self.tasks.spawn(self._write_l2(key, entry), "l2-write")

    def write_in_flight(self, key: str) -> asyncio.Task[None] | None:
        """Key's L2 write, if one is still in flight."""
        return self._writes.get(key)

    async def _write_l2(self, key: str, entry: CachedResponse) -> None:
        try:
            await self.call_l2(lambda l2: l2.set(key, entry))
        except StoreUnavailable:
            return
        finally:
            if self._writes.get(key) is asyncio.current_task():  # not a newer write's
                del self._writes[key]
        await self._publish(Event("set", key, self.instance, entry.stored_at))

    async def delete(self, key: str) -> bool:
        """Remove key from every layer and every instance's L1."""
        return any((await self.purge_key(key)).values())

    async def purge_key(self, key: str) -> dict[str, int | None]:
        """Remove one key everywhere; per-layer counts (None: that layer was unreachable)."""
        return await self._remove(lambda s: s.delete(key), Event("del", key, self.instance))

    async def delete_matching(self, pattern: str) -> int:
        """Remove every key matching the glob; the larger of the per-layer counts."""
        counts = await self.purge(pattern)
        return max((n for n in counts.values() if n is not None), default=0)

    async def purge(self, pattern: str) -> dict[str, int | None]:
        """Remove matches everywhere; per-layer counts (None: that layer was unreachable)."""
        event = Event("match", pattern, self.instance)
        return await self._remove(lambda s: s.delete_matching(pattern), event)

    async def clear(self) -> int:
        """Remove everything from every layer and every instance's L1."""
        counts = await self._remove(lambda s: s.clear(), Event("clear", "*", self.instance))
        return max((n for n in counts.values() if n is not None), default=0)

    async def _remove(
        self, op: Callable[[MemoryStore | RedisStore], Awaitable[int | bool]], event: Event
    ) -> dict[str, int | None]:
        # An L2 write still in flight would land after the purge and bring the entry back.
        await self.flush()
        self._generation += 1
        counts: dict[str, int | None] = {}
        if self.l1 is not None:
            counts["l1"] = int(await op(self.l1))
        if self.l2 is not None:
            try:
                counts["l2"] = int(await self.call_l2(op))
            except StoreUnavailable:
                counts["l2"] = None
            await self._publish(event)
        return counts

    async def quietly(self, call: Callable[[RedisStore], Awaitable[object]]) -> None:
        """An L2 call whose failure needs no answer (the breaker has counted it)."""
        with contextlib.suppress(StoreUnavailable):
            await self.call_l2(call)

    async def _publish(self, event: Event) -> None:
        # If this fails, other instances resync when they notice the outage themselves.
        await self.quietly(lambda l2: l2.publish(CHANNEL, event.encode()))

    # --- the backplane's side ----------------------------------------------------------

    def apply(self, event: Event) -> None:
        """Another instance changed something: drop our L1 copies, wake anyone waiting."""
        if event.op == "set":
            self.leases.wake(event.arg)
        if event.op in ("ban", "softban"):  # recorded even without an L1: lookups apply it
            # Not looked for in L1 (that would cost a walk per message): lookups apply bans,
            # and the entries a ban dooms go when next looked up or evicted.
            if not valid_subject(event.arg):
                log.warning("ignoring a ban of %.80r: not a tag or URL subject", event.arg)
                return
            if self.bans.add(event.arg, event.stamp, event.op == "softban") is None:
                log.warning("ignoring a ban stamped %r (not a time)", event.stamp)
                return
            self._generation += 1
            return
        if event.op == "unban":
            self.bans.lift(event.arg)
            return
        if self.l1 is None:
            return
        if event.op == "set":
            self.l1.drop(event.arg, older_than=event.stamp)  # a fresher local copy stays
            return
        self._generation += 1
        if event.op == "del":
            self.l1.drop(event.arg)
        elif event.op == "match":
            try:
                sweep = self.l1.sweep(Glob.parse(event.arg, MAX_EVENT_LENGTH))
                self.tasks.spawn(sweep, "l1-sweep")  # lookups miss its entries from now
            except ValueError as e:
                # Never matched: the cap bounds what anyone who can publish makes us do. Admin
                # caps globs, but its URL purge (a long URL's escaped key + ` *`) may be
                # longer, so our L1 is not trusted until L2 vouches for each key (as resync).
                log.warning("not matching a backplane purge pattern: %s", e)
                self._suspect = {key for key, _ in self.l1.items()}
        else:
            self.l1.drop_all()

    def resync(self) -> None:
        """After a lost subscription our L1 may have missed purges: do not trust it, and read
        the tag purges again.

        Its entries are not hits any more; each is looked up in L2 instead. Kept rather than
        dropped, so that when L2 has lost them too (Redis restarted empty) while the upstream
        is down, they can still stand in within their stale-if-error window.
        """
        self._generation += 1
        if self.l1 is not None:
            self._suspect = {key for key, _ in self.l1.items()}
        if self.l2 is not None:
            self.tasks.spawn(self.load_bans(), "load-bans")

    async def load_bans(self) -> None:
        """Read the purges on record in L2 (at start, and after a resync), and put right
        what the load refused, clamped or forgot there."""
        with contextlib.suppress(StoreUnavailable):
            loaded = self.bans.load(await self.call_l2(lambda l2: l2.load_bans()))
            if loaded.rewrite or loaded.delete:
                await self.call_l2(lambda l2: l2.save_bans(loaded.rewrite, loaded.delete))

    async def purge_tag(self, tag: str, soft: bool) -> tuple[int, bool]:
        """Purge every entry carrying `tag` (symbol=AAPL, route=chart), in every layer and
        instance, lazily. Returns the L1 entries it applies to here, and whether L2 (so the
        other instances) got it. Soft: entries stay, served only on upstream error."""
        await self.flush()
        at, reached = await self._ban(tag, soft)
        return await self._apply_ban(tag, at, soft), reached

    async def purge_url(self, resource: str) -> bool:
        """Purge every variant of one URL (`api /quote/AAPL`: key-header variants, cached
        POST bodies), lazily: one record in L2 and one message, whatever L2 holds. Whether
        L2 (so the other instances) got it."""
        _at, reached = await self._ban(url_subject(resource), soft=False)
        return reached

    async def _ban(self, subject: str, soft: bool) -> tuple[float, bool]:
        """Record a ban here, in L2 and (by message) on every instance: when, and whether
        L2 got it."""
        now = self.clock()
        recorded = self.bans.add(subject, now, soft)
        assert recorded is not None  # our own clock's time
        self._generation += 1
        records = {subject: self.bans.encode(subject)}
        forgotten = set(recorded.forgotten)
        for floor in (FLOOR, URL_FLOOR) if forgotten else ():  # the floors may have moved
            if self.bans.holds(floor):
                records[floor] = self.bans.encode(floor)
            else:
                forgotten.add(floor)
        reached = True
        try:
            await self.call_l2(lambda l2: l2.save_bans(records, tuple(forgotten - set(records))))
        except StoreUnavailable:
            reached = False
        if self.l2 is not None:
            await self._publish(Event("softban" if soft else "ban", subject, self.instance, now))
        return recorded.at, reached and self.l2 is not None

    async def lift_ban(self, subject: str) -> tuple[bool, bool]:
        """Lift a ban here, in L2 and (by message) on every instance: whether there was
        one here, and whether L2 got it."""
        lifted = self.bans.lift(subject)
        reached = True
        try:
            await self.call_l2(lambda l2: l2.save_bans({}, (subject,)))
        except StoreUnavailable:
            reached = False
        if self.l2 is not None:
            await self._publish(Event("unban", subject, self.instance, self.clock()))
        return lifted, reached and self.l2 is not None

    async def _apply_ban(self, tag: str, at: float, soft: bool) -> int:
        """For the answer to an admin's tag purge: the L1 entries stored before `at` that
        carry the tag, dropped (hard) or left for lookup to mark (soft). Lookups apply the
        ban anyway; this walk is only for the count (and frees memory early), so it runs
        once per admin request, never per backplane message or URL ban, one at a time, and
        lets the event loop run every few milliseconds."""
        if self.l1 is None:
            return 0
        applied = 0
        async with self._counting:
            deadline = time.perf_counter() + SWEEP_SLICE
            for key, entry in self.l1.items():  # a snapshot: the dict may change meanwhile
                if entry.stored_at < at and tag in entry_tags(entry):
                    applied += 1
                    if not soft:
                        self.l1.drop(key, older_than=at)  # a copy stored since stays
                if time.perf_counter() >= deadline:
                    await asyncio.sleep(0)
                    deadline = time.perf_counter() + SWEEP_SLICE
        return applied

    # --- inspection --------------------------------------------------------------------

    async def scan(self, pattern: str = "*") -> AsyncIterator[tuple[str, CachedResponse]]:
        """Live entries from L1, then those only in L2."""
        seen: set[str] = set()
        if self.l1 is not None:
            async for key, entry in self.l1.scan(pattern):
                seen.add(key)
                yield key, entry
        if self.l2 is not None and not self.breaker.is_open:
            try:
                async for key, entry in self.l2.scan(pattern):
                    if key not in seen:
                        yield key, entry
            except StoreUnavailable as e:
                self.breaker.failure(str(e))

    def health(self) -> tuple[str, str]:
        """("ok", "") or ("degraded", why)."""
        if self.l2 is not None and self.breaker.state != "closed":
            return "degraded", f"L2 unavailable ({self.breaker.state}): {self.breaker.reason}"
        return "ok", ""

    async def flush(self) -> None:
        """Wait for the L2 writes in flight (tests; a graceful shutdown)."""
        while self._writes:
            await asyncio.gather(*self._writes.values(), return_exceptions=True)

    async def close(self) -> None:
        """Finish L2 writes in flight, then close the L2 connection pool."""
        if self.l2 is not None:
            await self.flush()
            await self.l2.close()
