"""Long walks in slices of time, so that one walk never holds the event loop for long."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from typing import Final, TypeVar

T = TypeVar("T")

# How long a walk may hold the event loop before letting it run. Matching a glob costs up to
# len(key) * len(glob) per key (about 8 ms for a dense 1,024-character glob over an 8 KB
# key), so counting keys bounds nothing: 1000 such keys took 8 s (issue 11, findings 1, 7).
SLICE: Final = 0.005


async def sliced(items: Iterable[T], slice_seconds: float = SLICE) -> AsyncIterator[T]:
    """Each item in turn; every `slice_seconds` spent walking (the caller's work on the items
    included, since it runs between two of them), one turn of the event loop. With 0, a
    turn after every item."""
    deadline = time.perf_counter() + slice_seconds
    for item in items:
        yield item
        if time.perf_counter() >= deadline:
            await asyncio.sleep(0)
            deadline = time.perf_counter() + slice_seconds
