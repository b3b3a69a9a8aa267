"""Purges by tag, route or URL as timestamps (Varnish bans, FusionCache's tag expiry).

"symbol=AAPL purged at T" costs one record, however many entries carry the tag; an entry
stored before T is purged when it is next looked up. So a tag purge never scans Redis, and
reaches every layer and instance as one small message. A URL ban ("url api /quote/AAPL")
does the same for the variants of one URL (key-header variants, cached POST bodies) after
an unsafe request to it (RFC 9111 4.4).

Stamps and subjects come from other instances and from Redis, so they are untrusted: a stamp
that is not a finite time is refused, one further ahead than clocks may disagree is clamped;
a subject that is neither a tag as admin takes it nor a URL subject as url_subject makes it
is refused. Each table is bounded, in count and (by the subjects' length) in bytes: past its
bound the oldest bans fold into a floor ("everything stored before T is purged"), which
purges more, never less. Bans that no live entry can predate are forgotten.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from proxy.clock import CLOCK_SKEW, Clock, system_clock
from proxy.entry import CachedResponse
from proxy.keys import CacheKey
from proxy.origin import MAX_DELTA
from proxy.policy import TTLClass
from proxy.stamp import parse_stamp

Verdict = Literal["hard", "soft"] | None
MAX_SKEW = CLOCK_SKEW  # seconds a stamp may lie ahead of our clock (instances' clocks differ)
MAX_TAG_BANS = 10_000  # per table (hard, soft): purges an operator asked for
MAX_URL_BANS = 50_000  # any client's accepted POST makes one: at most ~1 KB each
FLOOR = "*"  # the record of the tag tables' floors (not a tag: a tag holds "=")
_URL = "url "  # URL bans' subjects: never a tag an entry carries (names are identifiers)
URL_FLOOR = _URL + FLOOR
MAX_TAG = 512  # characters in a tag (admin refuses longer ones)
_READABLE = 512  # characters of a resource a URL subject keeps as is; longer ones are hashed
log = logging.getLogger(__name__)


def entry_tags(entry: CachedResponse) -> tuple[str, ...]:
    """The tags a purge can name: the route (route=chart) and the path parameters."""
    return (f"route={entry.route}", *entry.tags)


def url_subject(resource: str) -> str:
    """The ban subject for every variant of one URL: `url api /quote/AAPL?range=1d`, or for
    a resource longer than 512 characters (keys reach 8 KB) `url #` and 32 hex digits of its
    SHA-256, so that every subject is small. The two never meet: a resource holds a space."""
    if len(resource) <= _READABLE:
        return _URL + resource
    digest = hashlib.sha256(resource.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{_URL}#{digest[:32]}"


def is_url_ban(subject: str) -> bool:
    """Whether a subject names a URL's variants rather than a tag."""
    return subject.startswith(_URL)


def valid_subject(subject: str) -> bool:
    """Whether a subject from another instance or Redis is fit to record: a tag as admin
    takes it, a URL subject no longer than url_subject makes them, or a floor."""
    if is_url_ban(subject):
        return len(_URL) < len(subject) <= len(_URL) + _READABLE
    return subject == FLOOR or valid_tag(subject)


def ban_horizon(classes: Iterable[TTLClass]) -> float:
    """The longest an entry can live under these classes (ttl, then the longest of grace,
    keep and the revalidate window cached.py gives entries with validators: one more ttl);
    a ban older than that predates every live entry. `ttl: origin` lets the upstream say
    up to 2^31 s of each (RFC 9111 1.2.2), so with such a class bans outlive any cache."""
    longest = 0.0
    for cls in classes:
        if cls.origin:
            ttl, grace, keep = float(MAX_DELTA), float(MAX_DELTA), float(MAX_DELTA)
        else:
            ttl = max(cls.ttl, cls.negative_ttl, cls.closed_ttl or 0.0)
            grace, keep = cls.stale_while_revalidate, cls.stale_if_error
        longest = max(longest, ttl + max(grace, keep, ttl, 60.0))
    return longest + MAX_SKEW


class _Table:
    """One kind of ban: subject -> time, a heap by time to find the oldest in O(log n),
    and a floor below which everything counts as banned."""

    __slots__ = ("_heap", "floor", "limit", "times")

    def __init__(self, limit: int) -> None:
        self.times: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []  # may hold outdated pairs: skipped lazily
        self.floor = 0.0
        self.limit = limit

    def __bool__(self) -> bool:
        return bool(self.times) or self.floor > 0.0

    def banned_at(self, subject: str) -> float:
        return max(self.times.get(subject, 0.0), self.floor)

    def set(self, subject: str, at: float) -> None:
        if at > self.floor and at > self.times.get(subject, 0.0):
            self.times[subject] = at
            heapq.heappush(self._heap, (at, subject))

    def remove(self, subject: str) -> bool:
        return self.times.pop(subject, None) is not None  # its heap pair goes stale

    def trim(self, before: float) -> list[str]:
        """Forget bans older than `before` (no entry predates them) and, while over the
        limit, fold the oldest into the floor. The subjects it let go of."""
        let_go: list[str] = []
        heap, times = self._heap, self.times
        while heap:
            at, subject = heap[0]
            if times.get(subject) != at:
                heapq.heappop(heap)  # lifted or superseded since it was pushed
            elif at < before or len(times) > self.limit:
                heapq.heappop(heap)
                del times[subject]
                let_go.append(subject)
                if at >= before:
                    self.floor = max(self.floor, at)
            else:
                break
        if self.floor < before:
            self.floor = 0.0
        if len(heap) > 2 * len(times) + 64:  # outdated pairs pile up: rebuild (amortised)
            self._heap = [(at, subject) for subject, at in times.items()]
            heapq.heapify(self._heap)
        return let_go


@dataclass(frozen=True, slots=True)
class Recorded:
    """A ban as recorded (its stamp clamped), and the subjects forgotten to make room."""

    at: float
    forgotten: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Loaded:
    """What Redis should hold after a load: records to write back (clamped) or delete."""

    rewrite: dict[str, bytes] = field(default_factory=dict)
    delete: tuple[str, ...] = ()


class Bans:
    """When each tag was last purged: hard (gone) and soft (stale; usable on error only);
    and when each URL's variants were last invalidated (hard)."""

    def __init__(
        self,
        horizon: float = 2.0 * MAX_DELTA + MAX_SKEW,  # ban_horizon() of a `ttl: origin` class
        clock: Clock = system_clock,
        tag_limit: int = MAX_TAG_BANS,
        url_limit: int = MAX_URL_BANS,
    ) -> None:
        self.horizon = horizon  # the longest lifetime an entry can have
        self.hard = _Table(tag_limit)
        self.soft = _Table(tag_limit)
        self.urls = _Table(url_limit)
        self._clock = clock

    def __len__(self) -> int:
        return len(self.hard.times) + len(self.soft.times) + len(self.urls.times)

    def widen(self, horizon: float) -> None:
        """A reload may allow longer lifetimes; entries stored before it keep theirs."""
        self.horizon = max(self.horizon, horizon)

    def _table(self, subject: str, soft: bool) -> _Table:
        if is_url_ban(subject):
            return self.urls  # always hard: a variant left stale is never wanted
        return self.soft if soft else self.hard

    def holds(self, subject: str) -> bool:
        """Whether any ban (or floor) is on record under `subject`."""
        return any(self._times(subject).values())

    def stamp(self, at: float) -> float | None:
        """A stamp fit to record: None if it is no time at all (NaN, infinite, negative);
        clamped to now + MAX_SKEW if later (a purge still, but not one into the future)."""
        if not math.isfinite(at) or at < 0.0:
            return None
        return min(at, self._clock() + MAX_SKEW)

    def add(self, subject: str, at: float, soft: bool) -> Recorded | None:
        """Record a purge of `subject` at wall-clock time `at` (later purges win); None if
        the stamp was refused. O(log n), plus what it forgets."""
        stamped = self.stamp(at)
        if stamped is None:
            return None
        table = self._table(subject, soft)
        if subject in (FLOOR, URL_FLOOR):
            table.floor = max(table.floor, stamped)
        else:
            table.set(subject, stamped)
        return Recorded(stamped, tuple(table.trim(self._clock() - self.horizon)))

    def lift(self, subject: str) -> bool:
        """Forget a ban (both kinds; `*` and `url *`: the floors). True if there was one."""
        if subject == FLOOR:
            lifted = bool(self.hard.floor or self.soft.floor)
            self.hard.floor = self.soft.floor = 0.0
            return lifted
        if subject == URL_FLOOR:
            lifted = self.urls.floor > 0.0
            self.urls.floor = 0.0
            return lifted
        return any([self._table(subject, False).remove(subject), self.soft.remove(subject)])

    def verdict(self, entry: CachedResponse, key: str) -> Verdict:
        """Whether a purge since the entry under `key` was stored applies to it."""
        hard, soft, urls = self.hard, self.soft, self.urls
        if not (hard or soft or urls):  # the common case, on every hit
            return None
        stored = entry.stored_at
        resource = CacheKey.variant_resource(key) if urls else None
        if resource is not None and urls.banned_at(url_subject(resource)) > stored:
            return "hard"
        if hard or soft:
            tags = entry_tags(entry)
            if hard and any(hard.banned_at(t) > stored for t in tags):
                return "hard"
            if soft and any(soft.banned_at(t) > stored for t in tags):
                return "soft"
        return None

    def listing(self, after: str, limit: int) -> tuple[list[dict[str, object]], str | None]:
        """Up to `limit` bans by subject after `after`: the floors first (as `*` and `url *`
        when set), and the next page's `after` (None on the last page)."""
        subjects = {*self.hard.times, *self.soft.times, *self.urls.times}
        if self.hard.floor or self.soft.floor:
            subjects.add(FLOOR)
        if self.urls.floor:
            subjects.add(URL_FLOOR)
        ordered = sorted(s for s in subjects if s > after)
        page = ordered[:limit]
        items: list[dict[str, object]] = [{"tag": s, **self._times(s)} for s in page]
        return items, (page[-1] if len(ordered) > limit else None)

    def _times(self, subject: str) -> dict[str, float | None]:
        if subject == FLOOR:
            hard, soft = self.hard.floor, self.soft.floor
        elif subject == URL_FLOOR:
            hard, soft = self.urls.floor, 0.0
        else:
            hard = self._table(subject, False).times.get(subject, 0.0)
            soft = self.soft.times.get(subject, 0.0)
        return {"hard": hard or None, "soft": soft or None}

    def encode(self, subject: str) -> bytes:
        """One subject's record, for the Redis hash that survives restarts."""
        times = self._times(subject)
        return json.dumps({"h": times["hard"] or 0.0, "s": times["soft"] or 0.0}).encode()

    def load(self, records: Mapping[bytes, bytes]) -> Loaded:
        """Merge records read back from Redis. Malformed or refused ones are to be deleted,
        clamped ones written back (so a stamp dated 2100 does not return at each restart),
        and so are the subjects forgotten meanwhile (with the floors they moved)."""
        touched: set[str] = set()
        refused = 0
        for raw_subject, raw in records.items():
            subject = raw_subject.decode(errors="replace")
            try:
                stamps = _read_record(subject, raw)
            except (ValueError, RecursionError):  # not JSON, or nested past the parser
                stamps = None
            except Exception:  # whatever else a forged record does, the rest still load
                log.exception("unreadable ban record %.80r", subject)
                stamps = None
            if stamps is None:
                refused += 1
                touched.add(subject)
                continue
            for at, soft in zip(stamps, (False, True), strict=True):
                if at == 0.0:
                    continue
                recorded = self.add(subject, at, soft)
                if recorded is None or recorded.at != at:
                    touched.add(subject)  # refused or clamped
                if recorded is not None and recorded.forgotten:
                    touched.update((*recorded.forgotten, FLOOR, URL_FLOOR))
            if not self.holds(subject):
                touched.add(subject)  # nothing left of it (expired, or under a floor)
        if refused:
            log.warning("deleting %d ban records from Redis: unreadable subject or stamps", refused)
        if not touched:
            return Loaded()
        kept = {s for s in touched if self.holds(s)}
        return Loaded({s: self.encode(s) for s in kept}, tuple(sorted(touched - kept)))


def _read_record(subject: str, raw: bytes) -> tuple[float, float] | None:
    """A record's hard and soft stamps (0.0: none), or None if it is not one to keep."""
    if not valid_subject(subject):
        return None
    record = json.loads(raw)
    if not isinstance(record, dict):
        return None
    hard, soft = parse_stamp(record.get("h")), parse_stamp(record.get("s"))
    return None if hard is None or soft is None else (hard, soft)


def valid_tag(tag: object) -> bool:
    """A tag is name=value, such as symbol=AAPL or route=chart."""
    return isinstance(tag, str) and "=" in tag.strip("=") and len(tag) <= MAX_TAG
