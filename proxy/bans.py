"""Purges by tag or route as timestamps (Varnish bans, FusionCache's tag expiry).

"symbol=AAPL purged at T" costs one record, however many entries carry the tag; an entry
stored before T is purged when it is next looked up. So a tag purge never scans Redis, and
reaches every layer and instance as one small message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from proxy.entry import CachedResponse

Verdict = Literal["hard", "soft"] | None
KEEP_BANS = 366 * 86400.0  # longer than any sensible entry lifetime; then forgotten


def entry_tags(entry: CachedResponse) -> tuple[str, ...]:
    """The tags a purge can name: the route (route=chart) and the path parameters."""
    return (f"route={entry.route}", *entry.tags)


@dataclass(slots=True)
class Bans:
    """When each tag was last purged: hard (gone) and soft (stale; usable on error only)."""

    hard: dict[str, float] = field(default_factory=dict)
    soft: dict[str, float] = field(default_factory=dict)

    def add(self, tag: str, at: float, soft: bool) -> None:
        """Record a purge of `tag` at wall-clock time `at` (later purges win)."""
        table = self.soft if soft else self.hard
        table[tag] = max(at, table.get(tag, 0.0))
        for old in [t for t, when in table.items() if when < at - KEEP_BANS]:
            del table[old]

    def verdict(self, entry: CachedResponse) -> Verdict:
        """Whether a purge since the entry was stored applies to it."""
        if not self.hard and not self.soft:  # the common case, on every hit
            return None
        tags = entry_tags(entry)
        if any(self.hard.get(t, 0.0) > entry.stored_at for t in tags):
            return "hard"
        if any(self.soft.get(t, 0.0) > entry.stored_at for t in tags):
            return "soft"
        return None

    def encode(self, tag: str) -> bytes:
        """One tag's record, for the Redis hash that survives restarts."""
        return json.dumps({"h": self.hard.get(tag, 0.0), "s": self.soft.get(tag, 0.0)}).encode()

    def load(self, records: dict[bytes, bytes]) -> None:
        """Merge records read back from Redis (malformed ones are skipped)."""
        for tag, raw in records.items():
            try:
                record = json.loads(raw)
                hard, soft = float(record["h"]), float(record["s"])
            except (ValueError, KeyError, TypeError):
                continue
            name = tag.decode(errors="replace")
            if hard:
                self.add(name, hard, soft=False)
            if soft:
                self.add(name, soft, soft=True)


def valid_tag(tag: object) -> bool:
    """A tag is name=value, such as symbol=AAPL or route=chart."""
    return isinstance(tag, str) and "=" in tag.strip("=") and len(tag) <= 512
