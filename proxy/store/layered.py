"""L1 in front of the remote tiers, each behind its circuit breaker, kept coherent by the
backplane.

Knows keys and entries, nothing about HTTP. Redis trouble never escapes: it is counted,
fed to the breaker, and turned into a miss (cashews' SafeRedis, FusionCache's breaker).
What only a shared store can do (leases, ban records, request counts, the channel) goes
through `shared`: Redis's, or `Solo` for an instance alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass

from proxy.backplane import CHANNEL, Event
from proxy.bans import Bans, valid_subject
from proxy.clock import Clock, system_clock
from proxy.entry import CachedResponse
from proxy.errors import StoreUnavailable
from proxy.glob import MAX_EVENT_LENGTH, Glob
from proxy.store.banning import Banning
from proxy.store.base import Layer, Shared, Store, StoreStats
from proxy.store.guarded import Guarded
from proxy.store.leases import Leases
from proxy.store.memory import MemoryStore
from proxy.store.popular import Popular
from proxy.store.solo import Solo
from proxy.tasks import Tasks

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Found:
    """A live entry and the layer it came from."""

    entry: CachedResponse
    layer: Layer
    soft_purged: bool = False  # a soft purge since it was stored: serve only on upstream error


class LayeredStore:
    """An ordered list of tiers: L1 (in this process, optional), then the remote tiers, each
    behind its breaker (a deployment has one, Redis, named l2). Reads walk them in order, a
    remote hit filling L1; writes go to L1 now and to the remote tiers in the background."""

    def __init__(
        self,
        l1: MemoryStore | None,
        remotes: Sequence[Guarded],
        tasks: Tasks,
        instance: str,
        clock: Clock = system_clock,
        bans: Bans | None = None,
        shared: Shared | None = None,
        popularity_flush: float = 1.0,
    ) -> None:
        names = [tier.name for tier in remotes] + (["l1"] if l1 is not None else [])
        if not names:
            raise ValueError("a layered store needs at least one tier")
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must differ: {names}")
        self.l1 = l1
        self.remotes = tuple(remotes)
        self.shared: Shared = shared or Solo()
        self.instance = instance
        self.stats = StoreStats()  # lookups through every tier
        self.tasks = tasks
        self.clock = clock
        self._writes: dict[str, asyncio.Task[None]] = {}  # remote writes in flight, by key
        self._generation = 0  # bumped by every invalidation of L1
        self.bans = bans or Bans(clock=clock)  # purges by tag, route and URL, applied at lookup
        # L1 keys held when the backplane was lost: they may have missed a purge, so they
        # are not hits until L2 vouches for them or they are fetched again (see resync).
        self._suspect: set[str] = set()
        # While distrusting: the keys vouched for since the last distrust. Every L1 key is
        # then suspect or in here, so a new distrust moves these back instead of copying all
        # of L1 (which cost a copy per backplane message: issue 11 second review, finding 1).
        # None when not distrusting; once it outgrows L1, the next distrust copies L1 anew,
        # a copy paid for by as many vouches.
        self._trusted_since: set[str] | None = None
        self.leases = Leases(self)  # cross-instance coalescing
        self.popularity = Popular(self, popularity_flush)  # requests per key: /hottest, warming
        self.banning = Banning(self)  # purges by tag, route and URL (bans), here and shared

    # --- reads -------------------------------------------------------------------------

    async def lookup(self, key: str) -> Found | None:
        """The live entry under key and where it was found (tag purges applied)."""
        found: Found | None = None
        entry = self.l1.peek(key) if self.l1 is not None else None
        if entry is not None and not (self._suspect and key in self._suspect):
            found = Found(entry, "l1")
        else:
            found = await self.lookup_remote(key)
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

    async def lookup_remote(self, key: str) -> Found | None:
        """Key's entry in the first remote tier holding it (a hit fills L1), bans not
        applied; None on a miss, or when none could answer."""
        generation = self._generation
        for tier in self.remotes:
            try:
                entry = await tier.get(key)
            except StoreUnavailable:
                self.leases.read_failed()
                continue
            if entry is None:
                continue
            # A purge that arrived while we read must not be undone by filling L1 with the
            # value it removed: fill only if nothing was invalidated meanwhile.
            if self.l1 is not None and generation == self._generation:
                await self.l1.set(key, entry)  # keeps its own expiry: the remaining lifetime
                self._trust(key)
            return Found(entry, tier.name)
        return None

    def _trust(self, key: str) -> None:
        """Key's L1 copy is vouched for (by L2, or fetched anew): a hit again."""
        if self._suspect:
            self._suspect.discard(key)
            if not self._suspect:
                self._suspect = set()  # a set never shrinks: let the large one go
        if self._trusted_since is not None:
            self._trusted_since.add(key)
            if len(self._trusted_since) > len(self.l1 or ()):
                self._trusted_since = None

    # --- writes ------------------------------------------------------------------------

    async def set(self, key: str, entry: CachedResponse) -> None:
        """Write L1 now and the remote tiers in the background: a slow Redis never delays
        the response."""
        if self.l1 is not None:
            await self.l1.set(key, entry)
            self._trust(key)
        if self.remotes:
            self._writes[key] = self.tasks.spawn(self._write_remote(key, entry), "l2-write")

    def write_in_flight(self, key: str) -> asyncio.Task[None] | None:
        """Key's remote write, if one is still in flight."""
        return self._writes.get(key)

    async def _write_remote(self, key: str, entry: CachedResponse) -> None:
        written = False
        try:
            for tier in self.remotes:
                with contextlib.suppress(StoreUnavailable):  # the breaker has counted it
                    await tier.set(key, entry)
                    written = True
        finally:
            if self._writes.get(key) is asyncio.current_task():  # not a newer write's
                del self._writes[key]
        if written:
            await self.publish(Event("set", key, self.instance, entry.stored_at))

    async def purge_key(self, key: str) -> dict[str, int | None]:
        """Remove one key everywhere; per-tier counts (None: that tier was unreachable)."""
        return await self._remove(lambda s: s.delete(key), Event("del", key, self.instance))

    async def purge(self, pattern: str) -> dict[str, int | None]:
        """Remove matches everywhere; per-tier counts (None: that tier was unreachable)."""
        event = Event("match", pattern, self.instance)
        return await self._remove(lambda s: s.delete_matching(pattern), event)

    async def clear(self) -> int:
        """Remove everything from every tier and every instance's L1."""
        counts = await self._remove(lambda s: s.clear(), Event("clear", "*", self.instance))
        return max((n for n in counts.values() if n is not None), default=0)

    async def _remove(
        self, op: Callable[[Store], Awaitable[int | bool]], event: Event
    ) -> dict[str, int | None]:
        # A remote write still in flight would land after the purge and bring the entry back.
        await self.flush()
        # Remote tiers first, then L1, the generation moving before each: a lookup reading
        # L2 while L2 is purged does not fill L1 (the generation moved while it read, or
        # L1's own purge follows), and one reading it later finds the entry gone. L1 first,
        # a lookup during its (sliced) walk refilled it from L2 (issue 11 review, finding 5).
        self._generation += 1
        remote: dict[str, int | None] = {}
        for tier in self.remotes:
            remote[tier.name] = None  # unreachable: it keeps them, and the answer says so
            with contextlib.suppress(StoreUnavailable):
                remote[tier.name] = int(await op(tier))
        self._generation += 1
        # Other instances are told as soon as L2 is purged: what they read from L2 after the
        # message is purged already. Not after our L1 walk, which may first wait for others.
        await self.publish(event)
        counts: dict[str, int | None] = {}
        if self.l1 is not None:
            counts["l1"] = int(await op(self.l1))
        return counts | remote

    async def publish(self, event: Event) -> None:
        """Tell the other instances (the shared store's channel), if it can be reached."""
        # If this fails, other instances resync when they notice the outage themselves.
        with contextlib.suppress(StoreUnavailable):
            await self.shared.publish(CHANNEL, event.encode())

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
            walk = self._sweep(event.arg)
            if walk is not None:
                self.tasks.spawn(walk, "l1-sweep")  # lookups miss its entries from now
            else:
                self._distrust_l1()
        else:
            self.l1.drop_all()

    def _sweep(self, pattern: str) -> Coroutine[None, None, int] | None:
        """L1's walk for another instance's pattern purge; None if it is not matched."""
        assert self.l1 is not None
        try:
            glob = Glob.parse(pattern, MAX_EVENT_LENGTH)
        except ValueError as e:
            # The cap bounds what anyone who can publish makes us do: admin sends no longer.
            log.warning("not matching a backplane purge pattern: %s", e)
            return None
        walk = self.l1.sweep(glob)
        if walk is None and self._trusted_since is None:  # as many walks as L1 allows are under way
            log.warning("too many pattern purges at once: not trusting L1 until L2 vouches")
        return walk

    def invalidated(self) -> None:
        """L1 changed under a purge: an L2 read already in flight may not fill it."""
        self._generation += 1

    def _distrust_l1(self) -> None:
        """Our L1 may have missed a purge: its entries are not hits until L2 vouches for each
        (or it is fetched again). Amortised O(1) per call: the keys vouched for since the
        last distrust become suspect again, and L1 is copied only once more keys were vouched
        for than it holds, or the suspects (evicted keys among them) outgrow twice L1."""
        if self.l1 is None:
            return
        if self._trusted_since is not None:
            self._suspect |= self._trusted_since
        if self._trusted_since is None or len(self._suspect) > 2 * len(self.l1):
            # Keys evicted since pile up in the suspects: past twice L1, start from L1 again
            # (a copy paid for by the L1-size additions that grew it).
            self._suspect = set(self.l1.keys())
        self._trusted_since = set()

    def resync(self) -> None:
        """After a lost subscription our L1 may have missed purges: do not trust it, and read
        the tag purges again.

        Its entries are not hits any more; each is looked up in L2 instead. Kept rather than
        dropped, so that when L2 has lost them too (Redis restarted empty) while the upstream
        is down, they can still stand in within their stale-if-error window.
        """
        self._generation += 1
        self._distrust_l1()
        self.tasks.spawn(self.banning.load(), "load-bans")

    # --- inspection --------------------------------------------------------------------

    async def scan(self, pattern: str = "*") -> AsyncIterator[tuple[str, CachedResponse]]:
        """Live entries from L1, then those only in the remote tiers (an unreachable one is
        left out)."""
        seen: set[str] = set()
        if self.l1 is not None:
            async for key, entry in self.l1.scan(pattern):
                seen.add(key)
                yield key, entry
        for tier in self.remotes:
            with contextlib.suppress(StoreUnavailable):  # its breaker has counted it
                async for key, entry in tier.scan(pattern):
                    if key not in seen:
                        seen.add(key)
                        yield key, entry

    def health(self) -> tuple[str, str]:
        """("ok", "") or ("degraded", why)."""
        for tier in self.remotes:
            breaker = tier.breaker
            if breaker.state != "closed":
                name = tier.name.upper()
                return "degraded", f"{name} unavailable ({breaker.state}): {breaker.reason}"
        return "ok", ""

    async def flush(self) -> None:
        """Wait for the remote writes in flight (tests; a graceful shutdown)."""
        while self._writes:
            await asyncio.gather(*self._writes.values(), return_exceptions=True)

    async def close(self) -> None:
        """Finish remote writes in flight, then close every tier's connections."""
        await self.flush()
        for tier in self.remotes:
            await tier.close()
