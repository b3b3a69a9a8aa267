"""What the cache did for one request, said once: an Outcome knows its metrics label and its
`Cache-Status` field (RFC 9211), so no outcome string is spelled anywhere else."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Final, Literal

NAME: Final = "cacheproxy"  # the cache's name in Cache-Status

# Metrics labels, in the order /stats lists them.
OUTCOMES: Final = (
    "hit_l1", "hit_l2", "miss", "stale", "stale_error", "coalesced", "bypass", "error",
)  # fmt: skip
# Outcomes served without this request causing an upstream call of its own.
SAVED_OUTCOMES: Final = frozenset({"hit_l1", "hit_l2", "stale", "stale_error", "coalesced"})
CACHEABLE_OUTCOMES: Final = SAVED_OUTCOMES | {"miss"}

Kind = Literal["hit", "stale", "stale_error", "coalesced", "miss", "bypass", "error"]
Forwarded = Literal["miss", "stale", "bypass", "method"]  # RFC 9211 2.2 fwd, and ours


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened: the kind, the layer a hit came from, the ttl it had left, why and with
    what status the request went upstream, and a detail (a reason, a source)."""

    kind: Kind
    layer: str = ""  # "l1" | "l2": where a hit (or a collapsed answer) came from
    ttl: float | None = None  # a fresh hit's seconds of freshness left
    fwd: Forwarded | None = None  # why the request went upstream (RFC 9211 2.2)
    fwd_status: int | None = None  # the upstream's status, when it is not the one served
    stored: bool = False  # the answer was stored (RFC 9211 2.5)
    detail: str = ""
    # Worked out once per value (hits are memoised, see hit()): what every response reads.
    label: str = field(init=False, compare=False, repr=False)  # cacheproxy_requests_total's
    cache_status: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        label = f"hit_{self.layer}" if self.kind == "hit" else self.kind
        object.__setattr__(self, "label", label)
        object.__setattr__(self, "cache_status", self._cache_status())

    @property
    def from_cache(self) -> bool:
        """Served from a stored entry (so Age counts our residence time, RFC 9111 5.1)."""
        return self.kind in ("hit", "stale", "stale_error")

    def _cache_status(self) -> str:
        """The Cache-Status field value (RFC 9211), its members in the RFC's order."""
        parts = [NAME]
        if self.kind in ("hit", "stale", "stale_error"):
            parts.append("hit")
        if self.fwd is not None:
            parts.append(f"fwd={self.fwd}")
        if self.fwd_status is not None:
            parts.append(f"fwd-status={self.fwd_status}")
        if self.ttl is not None:
            parts.append(f"ttl={int(self.ttl)}")
        if self.stored:
            parts.append("stored")
        if self.kind == "coalesced":
            parts.append("collapsed")
        if self.detail:
            parts.append(f"detail={self.detail}")
        return "; ".join(parts)


def hit(layer: str, ttl_left: float) -> Outcome:
    """A fresh entry, served from `layer`, with `ttl_left` seconds of freshness."""
    return _hit(layer, int(ttl_left))


@functools.lru_cache(maxsize=4096)  # the hit path's one allocation, mostly saved
def _hit(layer: str, ttl_left: int) -> Outcome:
    return Outcome("hit", layer, ttl_left, detail=layer)


STALE: Final = Outcome("stale", fwd="stale", detail="stale-while-revalidate")
COLLAPSED: Final = Outcome("coalesced", fwd="miss")  # another request's fetch, here
COLLAPSED_L2: Final = Outcome("coalesced", "l2", fwd="miss", detail="l2")  # another instance's
TOO_LARGE: Final = Outcome("miss", fwd="miss", detail="too-large")  # streamed, not stored
# Refused before any lookup (no route, a bad request): counted, and no Cache-Status sent.
REFUSED: Final = Outcome("error")


def stale_if_error(status: int) -> Outcome:
    """The upstream failed with `status`; a stale entry stands in (RFC 5861 4)."""
    return Outcome("stale_error", fwd="stale", fwd_status=status, detail="stale-if-error")


def fetched(stored: bool, reason: str = "", revalidated: bool = False) -> Outcome:
    """A miss answered by the upstream: stored, or not for `reason`. `revalidated`: it was a
    conditional request for an entry we hold, answered 304."""
    if revalidated:
        return Outcome("miss", fwd="stale", fwd_status=304, stored=stored, detail=reason)
    return Outcome("miss", fwd="miss", stored=stored, detail=reason)


def failed(status: int, kind: str) -> Outcome:
    """The upstream failed (`kind`: timeout, connect, status, ...) and nothing stands in."""
    return Outcome("error", fwd="miss", fwd_status=status, detail=f"upstream-{kind}")


def passed(reason: str) -> Outcome:
    """Forwarded uncached, for `reason` (`method`: one the cache does not serve)."""
    return Outcome("bypass", fwd="method" if reason == "method" else "bypass", detail=reason)
