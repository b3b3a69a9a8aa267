"""What the cached path does, decided from data (pure): with the entry a lookup found, serve,
serve and refresh, or revalidate (decide; nothing found is a fetch); with an upstream's
answer, store, serve uncached, hand to one client only, or let what we hold stand in (judge).
cached.py acts on these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import assert_never

from proxy.policy import (
    DontStore,
    Expired,
    Fresh,
    Stale,
    Storability,
    Store,
    freshness,
    is_upstream_failure,
)

# What to do with a lookup's result (decide).


# Serve the entry: `ttl_left` seconds of freshness remain; `refresh`: refresh-ahead is due,
# so fetch a new copy in the background too. The freshness verdict itself, so a hit makes
# no second value.
Serve = Fresh


@dataclass(frozen=True, slots=True)
class ServeStale:
    """Serve the entry stale, and refresh it in the background (RFC 5861 3)."""


@dataclass(frozen=True, slots=True)
class Revalidate:
    """Go upstream, with the entry's validators. `stand_in`: if the upstream fails, the
    entry may be served instead of the error (RFC 5861 4)."""

    stand_in: bool


Decision = Serve | ServeStale | Revalidate


def decide(
    stored_at: float, ttl: float, grace: float, keep: float, refresh_ahead: float,
    soft_purged: bool, now: float,
) -> Decision:  # fmt: skip
    """What a lookup that found an entry does with it. A soft-purged entry is never served
    while the upstream answers, but stands in (within its windows) when it fails."""
    verdict = freshness(stored_at, ttl, grace, keep, refresh_ahead, now)
    if soft_purged:
        return Revalidate(not isinstance(verdict, Expired) or verdict.usable_on_error)
    if isinstance(verdict, Fresh):
        return verdict
    if isinstance(verdict, Stale):
        return ServeStale()
    if isinstance(verdict, Expired):
        return Revalidate(verdict.usable_on_error)
    assert_never(verdict)


# What to do with an upstream's answer (judge).


@dataclass(frozen=True, slots=True)
class Stored:
    """Store the answer, serve it, and share it with the requests waiting on this fetch."""


@dataclass(frozen=True, slots=True)
class Uncached:
    """Serve the answer without storing it, for `reason`."""

    reason: str


@dataclass(frozen=True, slots=True)
class Private:
    """Serve the answer, as received, to this client only, for `reason` (DontStore.private)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Failed:
    """The upstream failed (a 5xx, a 429, an API error in a 200): what we hold stands in."""

    status: int


Judgement = Stored | Uncached | Private | Failed


def judge(
    status: int, verdict: Storability, api_error: str | None, revalidated: bool,
    stand_in: bool,
) -> Judgement:  # fmt: skip
    """What an upstream answer becomes. `stand_in`: something held may answer instead when
    the upstream fails (an entry within stale-if-error, or, for a background refresh, the
    entry it refreshes: a failed refresh never replaces it). `revalidated`: a 304 to our
    conditional request, which renews a held entry and so is never one client's alone.
    `api_error`: why a 200 is really an error (api_error()); never stored."""
    if stand_in and (api_error is not None or is_upstream_failure(status)):
        return Failed(status)
    if api_error is not None:
        return Uncached("api-error")
    if isinstance(verdict, Store):
        return Stored()
    if isinstance(verdict, DontStore):
        if verdict.private and not revalidated:
            return Private(verdict.reason)
        return Uncached(verdict.reason)
    assert_never(verdict)
