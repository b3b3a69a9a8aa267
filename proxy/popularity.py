"""Request counts per cache key, for `/hottest` and warm start: bounded in keys and in key
length, in this process and in L2 (issue 11, finding 11)."""

from __future__ import annotations

from collections import Counter

# Longer keys are not counted at all. A counted key must stay the key itself (warm start
# looks the hottest keys up in L2), so it cannot be shortened or hashed; real hot keys are
# short, and without this cap a flood of distinct 8 KB targets makes a set of 8 KB members.
MAX_KEY_LENGTH = 512
POPULAR_KEEP = 10_000  # keys the L2 popularity set keeps (trimmed at every flush)


def countable(key: str) -> bool:
    """Whether key may be a member of the popularity set."""
    return len(key) <= MAX_KEY_LENGTH


class Popularity:
    """Requests per key in this process: what the next flush sends to L2 or, without an L2,
    the counts themselves. Never more than `limit` keys: past it, only the busiest tenth
    stays (halved when `aging`, so old counts fade where nothing else ages them)."""

    def __init__(self, limit: int = POPULAR_KEEP, aging: bool = False) -> None:
        self.limit = limit
        self.aging = aging
        self._counts: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._counts)

    def count(self, key: str) -> None:
        """One more request for key (an overlong key is not counted)."""
        if not countable(key):
            return
        self._counts[key] += 1
        if len(self._counts) > self.limit:
            # Amortised: a trim happens once per (limit - limit // 10) new keys.
            top = self._counts.most_common(max(1, self.limit // 10))
            self._counts = Counter({k: n // 2 + 1 if self.aging else n for k, n in top})

    def most_common(self, n: int) -> list[tuple[str, int]]:
        """The n busiest keys, busiest first."""
        return self._counts.most_common(n)

    def take(self, n: int) -> dict[str, int]:
        """The n busiest keys with their counts, and start counting afresh."""
        counts, self._counts = self._counts, Counter()
        return dict(counts.most_common(n))
