"""GET /keys pages: L1 in key order, then L2 by SCAN cursor, each key listed once."""

from __future__ import annotations

import base64
import contextlib
import json
from dataclasses import dataclass

from proxy.entry import CachedResponse
from proxy.errors import StoreUnavailable
from proxy.keys import glob_to_regex
from proxy.store.layered import LayeredStore


@dataclass(frozen=True, slots=True)
class Listed:
    """One key on a page."""

    key: str
    entry: CachedResponse
    layers: tuple[str, ...]


def encode_cursor(phase: str, position: str | int) -> str:
    """An opaque cursor (clients pass it back as is)."""
    raw = json.dumps([phase, position]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str | int]:
    """The phase and position a cursor holds; ValueError for anything else."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        phase, position = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, TypeError) as e:
        raise ValueError("not a cursor this server gave out") from e
    if (phase, type(position)) not in (("l1", str), ("l2", int)):
        raise ValueError("not a cursor this server gave out")
    return phase, position


async def page(
    store: LayeredStore, glob: str, route: str | None, cursor: str | None, limit: int
) -> tuple[list[Listed], str | None]:
    """Up to `limit` live keys matching the glob (and route), and the next page's cursor.

    L1 pages walk its keys in order (the cursor is the last key listed); then L2 pages walk
    a SCAN, skipping keys L1 holds (they were listed already). A SCAN may return fewer keys
    than asked; only a null cursor means the end.
    """
    phase, position = decode_cursor(cursor) if cursor else ("l1", "")
    listed: list[Listed] = []
    if phase == "l1" and store.l1 is not None:
        regex = glob_to_regex(glob)
        after = str(position)
        live = store.l1.live_items()
        keys = sorted(k for k, e in live.items() if k > after and regex.fullmatch(k)
                      and (route is None or e.route == route))  # fmt: skip
        chosen = keys[:limit]
        in_l2 = [False] * len(chosen)
        if store.l2 is not None and chosen:
            with contextlib.suppress(StoreUnavailable):  # then listed as L1 only
                in_l2 = await store.l2.exists_many(chosen)
        listed = [
            Listed(k, live[k], ("l1", "l2") if both else ("l1",))
            for k, both in zip(chosen, in_l2, strict=True)
        ]
        if len(keys) > limit:
            return listed, encode_cursor("l1", chosen[-1])
        if store.l2 is None:
            return listed, None
        return listed, encode_cursor("l2", 0)
    if store.l2 is None:
        return [], None
    scan_cursor = int(position) if phase == "l2" else 0
    next_cursor, found = await store.l2.scan_page(glob, scan_cursor, max(limit, 10))
    held = store.l1
    for key, entry in found:
        if (route is None or entry.route == route) and (held is None or key not in held):
            listed.append(Listed(key, entry, ("l2",)))
    return listed, (encode_cursor("l2", next_cursor) if next_cursor else None)
