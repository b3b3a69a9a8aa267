"""Response headers as the cache keeps them: folded fields, what is stored, validators."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from multidict import CIMultiDict, CIMultiDictProxy

# RFC 9110 7.6.1: connection-specific fields, never forwarded nor stored. Content-Length is
# recomputed for every message we send, so it never travels through either. Proxy-* fields
# speak to a proxy (this one), never end to end.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade", "content-length",
})  # fmt: skip
# A header value or name holding one of these would split the response it is written into.
LINE_BREAK: Final = re.compile(r"[\r\n\x00]")
# Headers never stored with an entry: recomputed per response, or per client.
NOT_STORED = frozenset({"age", "set-cookie"})
Pairs = tuple[tuple[str, str], ...]


def end_to_end(
    headers: CIMultiDictProxy[str] | CIMultiDict[str] | Iterable[tuple[str, str]],
) -> list[tuple[str, str]]:
    """Headers minus hop-by-hop ones, including any the Connection header names."""
    if isinstance(headers, CIMultiDict | CIMultiDictProxy):
        pairs = list(headers.items())
    else:
        pairs = list(headers)
    named = {
        token.strip().lower()
        for name, value in pairs
        if name.lower() == "connection"
        for token in value.split(",")
    }
    return [
        (name, value)
        for name, value in pairs
        if (lower := name.lower()) not in HOP_BY_HOP
        and lower not in named
        and not lower.startswith("proxy-")
    ]


def joined(headers: CIMultiDictProxy[str], names: tuple[str, ...]) -> dict[str, str]:
    """Fields that may come as several lines, each folded into one value (RFC 9110 5.3)."""
    return {n: ", ".join(headers.getall(n)) for n in names if n in headers}


def fold(pairs: Iterable[tuple[str, str]], names: tuple[str, ...]) -> dict[str, str]:
    """Like joined(), for stored header pairs."""
    wanted = {n.lower(): n for n in names}
    folded: dict[str, list[str]] = {}
    for name, value in pairs:
        if (canonical := wanted.get(name.lower())) is not None:
            folded.setdefault(canonical, []).append(value)
    return {name: ", ".join(values) for name, values in folded.items()}


def keep_gzip_vary(headers: Pairs) -> Pairs:
    """A gzip entry says it varies on Accept-Encoding (we serve it inflated to some clients),
    whatever the upstream's Vary or a later 304's replacement of it said."""
    vary = fold(headers, ("Vary",)).get("Vary", "").lower()
    if is_gzip(headers) and "accept-encoding" not in vary:
        return (*headers, ("Vary", "Accept-Encoding"))
    return headers


def forwarded_for(prior: str | None, remote: str | None) -> str:
    """X-Forwarded-For for the upstream: the client's chain plus the client's address."""
    remote = remote or "unknown"
    return f"{prior}, {remote}" if prior else remote


def is_gzip(headers: Iterable[tuple[str, str]]) -> bool:
    """Whether header pairs say the body is gzip-encoded."""
    encoding = fold(headers, ("Content-Encoding",)).get("Content-Encoding", "")
    return encoding.strip().lower() == "gzip"


def has_validators(headers: Pairs) -> bool:
    """Whether a response carries ETag or Last-Modified, so it can be revalidated."""
    return any(n.lower() in ("etag", "last-modified") for n, _ in headers)


def stored_headers(headers: CIMultiDictProxy[str]) -> Pairs:
    """End-to-end headers worth keeping; a gzip entry varies on Accept-Encoding."""
    kept = tuple((n, v) for n, v in end_to_end(headers) if n.lower() not in NOT_STORED)
    return keep_gzip_vary(kept)
