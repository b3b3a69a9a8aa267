"""GET /keys pages: L1 in key order, then each remote tier by SCAN cursor, each key listed
once."""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

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


def encode_cursor(phase: str, position: str | list[int]) -> str:
    """An opaque cursor (clients pass it back as is)."""
    raw = json.dumps([phase, position]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str | list[int]]:
    """The phase and position a cursor holds; ValueError for anything else."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        phase, position = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, TypeError, RecursionError) as e:  # RecursionError: `[[[[...`
        raise ValueError("not a cursor this server gave out") from e
    if phase == "l1" and isinstance(position, str):
        return phase, position
    if (
        phase == "l2"
        and isinstance(position, list)
        and len(position) == 2
        and all(type(n) is int and 0 <= n < 2**64 for n in position)
    ):
        return phase, position
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
    then every key each remote tier holds and none after it, by SCAN (the cursor is a SCAN
    cursor and an offset into its batch). A key is in exactly one of the walks, whichever
    tier it moves to between pages. A page may hold fewer keys than asked; only a null
    cursor means the end. Entries a purge removed are left out. Matching lets the event
    loop run every `slice_seconds`. StoreUnavailable if a remote tier cannot be walked.
    """
    phase, position = decode_cursor(cursor) if cursor else ("l1", "")
    remotes = store.remotes
    if phase == "l1" and store.l1 is not None:
        listed, last = await _l1_page(store, glob, route, str(position), limit, slice_seconds)
        if last is not None:
            return listed, encode_cursor("l1", last)
        return listed, (encode_cursor(remotes[0].name, [0, 0]) if remotes else None)
    if not remotes:
        return [], None
    at = next((i for i, tier in enumerate(remotes) if tier.name == phase), 0)
    tier, later = remotes[at], remotes[at + 1 :]
    scan_cursor, offset = position if isinstance(position, list) else [0, 0]
    next_cursor, found = await tier.scan_page(glob, scan_cursor, max(limit, 10))
    held = store.l1
    wanted = [(k, e) for k, e in found if _wanted(store, k, e, route)]
    keys = [k for k, _ in wanted]
    elsewhere = await _held_by(later, keys) if later else [False] * len(keys)
    batch = [
        Listed(k, e, ("l1", tier.name) if held is not None and k in held else (tier.name,))
        for (k, e), after in zip(wanted, elsewhere, strict=True)
        if not after  # listed in the walk of a tier after this one
    ]
    rest = batch[offset:]
    if len(rest) > limit:  # the same SCAN step again next time, further in
        return rest[:limit], encode_cursor(tier.name, [scan_cursor, offset + limit])
    if next_cursor:
        return rest, encode_cursor(tier.name, [next_cursor, 0])
    return rest, (encode_cursor(later[0].name, [0, 0]) if later else None)


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
