"""CachedResponse and its versioned byte encoding: the only serializer."""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from typing import Final

from proxy.bodies import Inflated, measure
from proxy.clock import CLOCK_SKEW
from proxy.errors import CorruptEntry
from proxy.headers import LINE_BREAK, end_to_end
from proxy.origin import MAX_DELTA
from proxy.policy import STORABLE_STATUS
from proxy.wire import Wire, serialize

MAGIC: Final = b"CP"
VERSION: Final = 3  # 2: grace and keep windows; 3: revalidate window
# magic, version, status, stored_at, ttl, grace, keep, revalidate, initial_age, metadata
# length, body length
_HEAD: Final = struct.Struct(">2sBHddddddII")
# RFC 9110 5.1: a field name is a token; anything else (a space before the colon) is read
# differently by different parsers.
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_LATEST: Final = 2.0**34  # seconds since the epoch: the year 2514
# Per-entry bookkeeping that is neither body nor header text (object headers, dict slot).
ENTRY_OVERHEAD: Final = 200


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """A stored upstream response and what is needed to serve it later."""

    status: int
    headers: tuple[tuple[str, str], ...]  # end-to-end headers, as the upstream sent them
    body: bytes
    stored_at: float  # wall-clock seconds when stored
    ttl: float  # seconds of freshness from stored_at
    initial_age: float = 0.0  # the Age the upstream reported
    route: str = ""
    tags: tuple[str, ...] = ()  # e.g. "symbol=AAPL", for purges by tag
    grace: float = 0.0  # after ttl: served stale while one background refresh runs
    keep: float = 0.0  # after ttl: served stale only when the upstream fails
    revalidate: float = 0.0  # after ttl: never served, kept for its validators (ETag, ...)
    # Caches made on first use and kept, not part of the value (not compared, not encoded):
    # see wire() and inflated().
    _wire: Wire | None = field(default=None, init=False, compare=False, repr=False)
    _inflated: Inflated | None = field(default=None, init=False, compare=False, repr=False)

    @property
    def expires_at(self) -> float:
        """When the entry stops being fresh."""
        return self.stored_at + self.ttl

    @property
    def keep_until(self) -> float:
        """When the entry is of no use at all: stores drop it then (Varnish's ttl+grace+keep)."""
        return self.stored_at + self.ttl + max(self.grace, self.keep, self.revalidate)

    @property
    def size(self) -> int:
        """Bytes the entry costs in memory: body plus header text plus bookkeeping. Header
        text counts twice: as pairs, and serialized (`wire`, made on the first hit)."""
        return (
            len(self.body)
            + sum(2 * (len(name) + len(value)) + 4 for name, value in self.headers)
            + ENTRY_OVERHEAD
        )

    def wire(self) -> Wire:
        """Its status line and headers serialized (wire.py): made on the entry's first hit and
        reused by every later one."""
        wire = self._wire
        if wire is None:
            wire = serialize(self.status, self.headers, len(self.body), self.stored_at)
            object.__setattr__(self, "_wire", wire)  # frozen: a cache, not a change of value
        return wire

    def inflated(self) -> Inflated:
        """What its gzip body inflates to: measured on the first request that refuses gzip,
        so later ones stream it with a Content-Length at once."""
        inflated = self._inflated
        if inflated is None:
            inflated = measure(self.body)
            object.__setattr__(self, "_inflated", inflated)
        return inflated

    def header(self, name: str) -> str | None:
        """The first value of a header, by case-insensitive name."""
        lower = name.lower()
        for key, value in self.headers:
            if key.lower() == lower:
                return value
        return None


def encode(entry: CachedResponse) -> bytes:
    """Bytes for an L2 store: fixed header, JSON metadata, then the body verbatim."""
    meta = json.dumps(
        {"h": entry.headers, "r": entry.route, "t": entry.tags}, separators=(",", ":")
    ).encode()
    head = _HEAD.pack(
        MAGIC, VERSION, entry.status, entry.stored_at, entry.ttl, entry.grace, entry.keep,
        entry.revalidate, entry.initial_age, len(meta), len(entry.body),
    )  # fmt: skip
    return head + meta + entry.body


def decode(data: bytes, now: float | None = None) -> CachedResponse:
    """Inverse of encode; anything else (corrupt, truncated, foreign, old) is CorruptEntry.
    With `now`, an entry stored later than another instance's clock could say is one too."""
    if len(data) < _HEAD.size:
        raise CorruptEntry("truncated header")
    (magic, version, status, stored_at, ttl, grace, keep, revalidate, initial_age, meta_len,
     body_len) = _HEAD.unpack_from(data)  # fmt: skip
    if magic != MAGIC:
        raise CorruptEntry("not a cacheproxy entry")
    if version != VERSION:
        raise CorruptEntry(f"entry version {version}, expected {VERSION}")
    if len(data) != _HEAD.size + meta_len + body_len:
        raise CorruptEntry("length mismatch")
    try:
        meta = json.loads(data[_HEAD.size : _HEAD.size + meta_len])
        headers = tuple((str(k), str(v)) for k, v in meta["h"])
        route = str(meta["r"])
        tags = tuple(str(t) for t in meta["t"])
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise CorruptEntry(f"bad metadata: {e}") from e
    # L2 bytes are untrusted input (anyone who can write to Redis writes them): refuse what
    # this proxy never stores, and never take framing from them.
    if status not in STORABLE_STATUS:
        raise CorruptEntry(f"status {status} is never stored")
    # Times: finite, and no longer than RFC 9111's delta-seconds allow (an infinite ttl
    # would never leave L1, a huge one overflows Age and Date); never from the future,
    # where no purge could reach it.
    if not all(0.0 <= d <= MAX_DELTA for d in (ttl, grace, keep, revalidate, initial_age)):
        raise CorruptEntry("a lifetime that is not a number of seconds")
    if not 0.0 <= stored_at <= _LATEST or (now is not None and stored_at > now + CLOCK_SKEW):
        raise CorruptEntry(f"stored at an impossible time ({stored_at!r})")
    if status == 204 and body_len:  # RFC 9110 15.3.5: no content, so no body to smuggle
        raise CorruptEntry("a 204 with a body")
    if any(LINE_BREAK.search(name) or LINE_BREAK.search(value) for name, value in headers):
        # The upstream's parser never lets one through: this came from somewhere else, and
        # served, it would split the response.
        raise CorruptEntry("a header with a line break")
    if not all(_TOKEN.fullmatch(name) for name, _ in headers):
        raise CorruptEntry("a header name that is not a token")
    # Stored headers are end to end: framing (Content-Length, Transfer-Encoding) and other
    # hop-by-hop fields are the sender's to write, from the body it sends (RFC 9112 6).
    headers = tuple(end_to_end(headers))
    return CachedResponse(
        status=status,
        headers=headers,
        body=data[_HEAD.size + meta_len :],
        stored_at=stored_at,
        ttl=ttl,
        initial_age=initial_age,
        route=route,
        tags=tags,
        grace=grace,
        keep=keep,
        revalidate=revalidate,
    )
