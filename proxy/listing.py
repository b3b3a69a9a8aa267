"""GET /keys pages: L1 in key order, then each remote tier by SCAN cursor, each key listed
once (see `_remote_page` for what SCAN lets a remote walk promise)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from proxy.entry import CachedResponse
from proxy.errors import StoreUnavailable
from proxy.glob import Glob
from proxy.store.guarded import Guarded
from proxy.store.layered import LayeredStore
from proxy.walk import SLICE, sliced


@dataclass(frozen=True, slots=True)
class Listed:
    """One key on a page."""

    key: str
    entry: CachedResponse
    layers: tuple[str, ...]


# A page ending inside a SCAN step remembers the keys it listed from that step by digest (16
# bytes: a 64-bit one could be forced to collide, hiding a key), at most MAX_PENDING of them,
# so a cursor stays small enough for a request line (1.4 KB of base64 at most).
DIGEST: Final = 16
MAX_PENDING: Final = 64
STEPS: Final = 4  # SCAN steps one page may take, each bounded by its COUNT


@dataclass(frozen=True, slots=True)
class ScanAt:
    """Where a remote tier's walk goes on: a SCAN cursor, and the digests of keys already
    listed that the walk from there may return again (so they are left out)."""

    cursor: int
    listed: tuple[bytes, ...] = ()


def digest(key: str) -> bytes:
    """What a cursor keeps of a listed key: bounded, whatever the key's length."""
    return hashlib.blake2b(key.encode(errors="surrogatepass"), digest_size=DIGEST).digest()


def encode_cursor(phase: str, position: str | ScanAt) -> str:
    """An opaque cursor (clients pass it back as is)."""
    if isinstance(position, ScanAt):
        listed = base64.urlsafe_b64encode(b"".join(position.listed)).decode()
        raw = json.dumps([phase, [position.cursor, listed]]).encode()
    else:
        raw = json.dumps([phase, position]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str | ScanAt]:
    """The phase and position a cursor holds; ValueError for anything else."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        phase, position = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, TypeError, RecursionError) as e:  # RecursionError: `[[[[...`
        raise ValueError("not a cursor this server gave out") from e
    if phase == "l1" and isinstance(position, str):
        return phase, position
    if phase == "l2" and isinstance(position, list) and len(position) == 2:
        scan_cursor, listed = position
        if (
            type(scan_cursor) is int
            and 0 <= scan_cursor < 2**64
            and isinstance(listed, str)
            and len(listed) <= 4 * (MAX_PENDING * DIGEST + 2) // 3
        ):
            try:
                raw = base64.urlsafe_b64decode(listed.encode("ascii"))
            except ValueError as e:  # binascii.Error and UnicodeEncodeError are ValueErrors
                raise ValueError("not a cursor this server gave out") from e
            if len(raw) % DIGEST == 0 and len(raw) <= MAX_PENDING * DIGEST:
                digests = tuple(raw[i : i + DIGEST] for i in range(0, len(raw), DIGEST))
                return phase, ScanAt(scan_cursor, digests)
    raise ValueError("not a cursor this server gave out")


def _wanted(store: LayeredStore, key: str, entry: CachedResponse, route: str | None) -> bool:
    return (route is None or entry.route == route) and store.bans.verdict(entry, key) != "hard"


async def page(
    store: LayeredStore,
    glob: str,
    route: str | None,
    cursor: str | None,
    limit: int,
    slice_seconds: float = SLICE,
) -> tuple[list[Listed], str | None]:
    """Up to `limit` live keys matching the glob (and route), and the next page's cursor.

    First the keys only L1 holds, in key order (the cursor is the last key looked at);
    then every key each remote tier holds and none after it, by SCAN (see `_remote_page`).
    A key is in exactly one of the walks, whichever tier it moves to between pages. A page
    may hold fewer keys than asked; only a null cursor means the end. Entries a purge
    removed are left out. Matching lets the event loop run every `slice_seconds`.
    StoreUnavailable if a remote tier cannot be walked.
    """
    phase, position = decode_cursor(cursor) if cursor else ("l1", "")
    remotes = store.remotes
    if phase == "l1" and store.l1 is not None:
        listed, last = await _l1_page(store, glob, route, str(position), limit, slice_seconds)
        if last is not None:
            return listed, encode_cursor("l1", last)
        return listed, (encode_cursor(remotes[0].name, ScanAt(0)) if remotes else None)
    if not remotes:
        return [], None
    at = next((i for i, tier in enumerate(remotes) if tier.name == phase), 0)
    tier, later = remotes[at], remotes[at + 1 :]
    start = position if isinstance(position, ScanAt) else ScanAt(0)
    listed, resume = await _remote_page(store, tier, later, glob, route, start, limit)
    if resume is not None:
        return listed, encode_cursor(tier.name, resume)
    return listed, (encode_cursor(later[0].name, ScanAt(0)) if later else None)


async def _remote_page(
    store: LayeredStore,
    tier: Guarded,
    later: Sequence[Guarded],
    glob: str,
    route: str | None,
    at: ScanAt,
    limit: int,
) -> tuple[list[Listed], ScanAt | None]:
    """One page of a remote tier's walk: whole SCAN steps (at most STEPS), and where the
    walk goes on (None at its end).

    SCAN promises that a key held throughout a walk is returned at least once, and that a
    cursor may be asked again, but not that it then returns the same keys: keys added since
    and a rehash change what a step covers. So a page never resumes "the same step again, at
    an offset". A step that does not fit is left whole to the next page; one that alone
    holds more than a page (asked again with COUNT 1 first: one bucket) is listed in part,
    and the cursor keeps the digests of the keys listed; the next page asks the same SCAN
    cursor and leaves those keys out of whatever it returns now, until a step that moves on
    returns them (or the walk ends). Hence: a key held throughout the walk is listed at
    least once, and exactly once unless SCAN itself returns a key again after a step that
    moved past it, which Redis does only when its table shrinks mid-walk (after many keys
    are removed), or unless more than MAX_PENDING keys wait to be left out at once (the
    oldest not in the step at hand are forgotten). Keys added or removed during the walk may
    be listed or not. Should one step ever hold more than MAX_PENDING keys beyond a page,
    the rest of it is skipped, so that a walk always ends.
    """
    listed: list[Listed] = []
    cursor, pending = at.cursor, at.listed
    for _ in range(STEPS):
        room = limit - len(listed)
        count = max(1, room * 3 // 4)  # a step returns COUNT keys and the rest of a bucket
        step = await _step(store, tier, later, glob, route, cursor, count, pending)
        if len(step.fresh) > room and not listed and count > 1:
            # Nothing of this step is listed yet, so it may be asked again, smaller.
            step = await _step(store, tier, later, glob, route, cursor, 1, pending)
        if len(step.fresh) > room:
            if listed:  # the whole step goes on the next page
                return listed, ScanAt(cursor, pending)
            part = step.fresh[:room]
            here = tuple(d for d in pending if d in step.seen) + tuple(
                digest(item.key) for item in part
            )
            if len(here) <= MAX_PENDING:
                # Room is made by forgetting the oldest digests of keys not in this step,
                # most likely keys gone since they were listed.
                others = [d for d in pending if d not in step.seen]
                kept = others[max(0, len(others) + len(here) - MAX_PENDING) :]
                return part, ScanAt(cursor, (*kept, *here))
            # Never with Redis' chains of a few keys; see the docstring.
        listed.extend(step.fresh[:room])
        pending = tuple(d for d in pending if d not in step.seen)
        cursor = step.next_cursor
        if cursor == 0:
            return listed, None
        if len(listed) == limit:
            break
    return listed, ScanAt(cursor, pending)


@dataclass(frozen=True, slots=True)
class _Step:
    next_cursor: int
    seen: frozenset[bytes]  # digests of every key the step returned
    fresh: list[Listed]  # the ones to list, in key order


async def _step(
    store: LayeredStore,
    tier: Guarded,
    later: Sequence[Guarded],
    glob: str,
    route: str | None,
    cursor: int,
    count: int,
    pending: tuple[bytes, ...],
) -> _Step:
    """One SCAN step: what it returned, and which of its keys to list (wanted, not listed
    already, and held by no tier after this one: those are listed in that tier's walk)."""
    next_cursor, found = await tier.scan_page(glob, cursor, count)
    entries = dict(found)  # SCAN may return a key twice, even in one step
    digests = {key: digest(key) for key in entries}
    wanted = [
        (k, e)
        for k, e in sorted(entries.items())
        if digests[k] not in pending and _wanted(store, k, e, route)
    ]
    keys = [k for k, _ in wanted]
    elsewhere = await _held_by(later, keys) if later else [False] * len(keys)
    held = store.l1
    fresh = [
        Listed(k, e, ("l1", tier.name) if held is not None and k in held else (tier.name,))
        for (k, e), after in zip(wanted, elsewhere, strict=True)
        if not after
    ]
    return _Step(next_cursor, frozenset(digests.values()), fresh)


async def _held_by(tiers: Sequence[Guarded], keys: list[str]) -> list[bool]:
    """Which keys any of these tiers holds (one that cannot answer is taken to hold none)."""
    held = [False] * len(keys)
    for tier in tiers:
        with contextlib.suppress(StoreUnavailable):
            held = [a or b for a, b in zip(held, await tier.exists_many(keys), strict=True)]
    return held


async def _l1_page(
    store: LayeredStore, glob: str, route: str | None, after: str, limit: int, slice_seconds: float
) -> tuple[list[Listed], str | None]:
    """Keys only L1 holds, after `after`; the last key looked at when the page filled up."""
    assert store.l1 is not None
    matcher = Glob.parse(glob, max_length=None)  # admin bounded it
    live = store.l1.live_items()
    candidates = [k for k in live if k > after]
    # However costly the matching (long keys, a dense glob), hits are served meanwhile.
    keys = [
        k
        async for k in sliced(candidates, slice_seconds)
        if matcher.matches(k) and _wanted(store, k, live[k], route)
    ]
    keys.sort()
    listed: list[Listed] = []
    for start in range(0, len(keys), limit):
        chunk = keys[start : start + limit]
        # Keys a remote tier holds are listed in its walk; unreachable, listed here.
        for key, remote in zip(chunk, await _held_by(store.remotes, chunk), strict=True):
            if not remote:
                listed.append(Listed(key, live[key], ("l1",)))
                if len(listed) == limit:
                    return listed, key
    return listed, None
