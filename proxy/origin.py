"""What the origin's own headers say, read as a shared cache (pure, RFC 9111 and 9110):
freshness lifetime and age, conditional requests, and how a 304 updates a stored response."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from email.utils import parsedate_to_datetime
from typing import Final

MAX_DELTA: Final = 2**31  # RFC 9111 1.2.2: larger delta-seconds mean this
HEURISTIC_FRACTION: Final = 0.1  # RFC 9111 4.2.2: "10% of the interval ... is a typical setting"
HEURISTIC_CAP: Final = 86400.0  # we never guess more than a day
# RFC 9110 15.1: statuses cacheable by default, i.e. heuristic freshness may apply.
HEURISTIC_STATUS: Final = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
_ETAG: Final = re.compile(r'(W/)?"([^"]*)"')
# name[=token|"quoted, may hold commas"], RFC 9111 5.2
_DIRECTIVE: Final = re.compile(r'([^\s=,"]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^,]*))?')
# RFC 9110 15.4.5: what a 304 repeats from the 200 it stands for.
NOT_MODIFIED_FIELDS: Final = frozenset(
    {"cache-control", "content-location", "date", "etag", "expires", "vary", "last-modified"}
)
# RFC 9111 3.2: fields a 304 must not overwrite in the stored response.
_NOT_UPDATED: Final = frozenset({"content-length", "content-encoding", "transfer-encoding"})


def parse_cache_control(value: str) -> dict[str, str | None]:
    """`public, max-age=10` -> {"public": None, "max-age": "10"} (RFC 9111 5.2).

    Names are case-insensitive; of a repeated directive the first occurrence counts
    (RFC 9111 4.2.1 allows using the first).
    """
    directives: dict[str, str | None] = {}
    for m in _DIRECTIVE.finditer(value):
        name = m.group(1).lower()
        if name not in directives:
            arg = m.group(2)
            directives[name] = None if arg is None else arg.strip().strip('"')
    return directives


def delta_seconds(value: str | None) -> float | None:
    """RFC 9111 1.2.2 delta-seconds: ASCII digits only, capped at 2^31; None if invalid."""
    if value is None or not value.isascii() or not value.isdigit():
        return None
    return float(MAX_DELTA if len(value) > 10 else min(int(value), MAX_DELTA))


def parse_age(value: str | None) -> float:
    """An Age header as seconds; absent or invalid counts as 0 (RFC 9111 5.1)."""
    return delta_seconds(value.strip() if value else None) or 0.0


def http_date(value: str | None) -> float | None:
    """An HTTP-date (RFC 9110 5.6.7) as epoch seconds; None if absent or invalid."""
    if not value:
        return None
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):  # e.g. year 99999999999999999999
        return None
    if when.tzinfo is None:
        return None
    return when.timestamp()


def freshness_lifetime(status: int, headers: Mapping[str, str], response_time: float) -> float:
    """RFC 9111 4.2.1 for a shared cache: s-maxage, then max-age, then Expires - Date, then
    the heuristic of 4.2.2; 0 when none applies (the response is stale at once)."""
    cc = parse_cache_control(headers.get("Cache-Control", ""))
    for directive in ("s-maxage", "max-age"):
        if directive in cc:
            lifetime = delta_seconds(cc[directive])
            return 0.0 if lifetime is None else lifetime  # invalid: treat as stale
    date = http_date(headers.get("Date")) or response_time  # 4.2.1: no Date, use receipt
    if "Expires" in headers:
        expires = http_date(headers["Expires"])
        return 0.0 if expires is None else max(0.0, expires - date)  # 5.3: invalid = past
    last_modified = http_date(headers.get("Last-Modified"))
    if last_modified is not None and (status in HEURISTIC_STATUS or "public" in cc):
        return min(max(0.0, date - last_modified) * HEURISTIC_FRACTION, HEURISTIC_CAP)
    return 0.0


def corrected_initial_age(
    headers: Mapping[str, str], request_time: float, response_time: float
) -> float:
    """RFC 9111 4.2.3: how old the response already was when we received it."""
    date = http_date(headers.get("Date"))
    apparent_age = max(0.0, response_time - date) if date is not None else 0.0
    age_value = parse_age(headers.get("Age"))
    corrected_age_value = age_value + max(0.0, response_time - request_time)
    return max(apparent_age, corrected_age_value)


def stale_windows(cc: Mapping[str, str | None], grace: float, keep: float) -> tuple[float, float]:
    """The stale-while-revalidate and stale-if-error windows the origin allows (RFC 5861);
    the given defaults where it says nothing; none under must-revalidate, proxy-revalidate or
    s-maxage (RFC 9111 5.2.2.2, 5.2.2.8, 5.2.2.10)."""
    if {"must-revalidate", "proxy-revalidate", "s-maxage"} & cc.keys():
        return 0.0, 0.0
    swr = delta_seconds(cc["stale-while-revalidate"]) if "stale-while-revalidate" in cc else None
    sie = delta_seconds(cc["stale-if-error"]) if "stale-if-error" in cc else None
    return (grace if swr is None else swr), (keep if sie is None else sie)


def _tags(value: str) -> list[str]:
    return [opaque for _weak, opaque in _ETAG.findall(value)]


def precondition(headers: Mapping[str, str], etag: str | None, last_modified: str | None) -> int:
    """The status preconditions give a GET or HEAD against a stored 200 (RFC 9110 13.2.2):
    412 when If-Match / If-Unmodified-Since fail, 304 when If-None-Match /
    If-Modified-Since say the client has it, else 200. `last_modified` falls back to the
    stored Date when there is no Last-Modified (RFC 9111 4.3.2)."""
    if_match = headers.get("If-Match")
    if if_match is not None:
        if if_match.strip() != "*":  # "*": a current representation exists, and we hold it
            # Strong comparison (RFC 9110 8.8.3.2): a weak tag on either side never matches.
            stored = _strong_tags(etag or "")
            if not stored or stored[0] not in _strong_tags(if_match):
                return 412
    elif (unmodified := http_date(headers.get("If-Unmodified-Since"))) is not None:
        modified = http_date(last_modified)
        if modified is None or modified > unmodified:
            return 412
    if not_modified(
        headers.get("If-None-Match"), headers.get("If-Modified-Since"), etag, last_modified
    ):
        return 304
    return 200


def _strong_tags(value: str) -> list[str]:
    return [opaque for weak, opaque in _ETAG.findall(value) if not weak]


def not_modified(
    if_none_match: str | None,
    if_modified_since: str | None,
    etag: str | None,
    last_modified: str | None,
) -> bool:
    """Whether a GET or HEAD with these preconditions gets 304 against a stored response
    with these validators (RFC 9110 13.1.2, 13.1.3, in the order of 13.2.2)."""
    if if_none_match is not None:
        if if_none_match.strip() == "*":
            return True  # a current representation exists: we hold it
        if etag is None:
            return False
        stored = _tags(etag)
        # Weak comparison (RFC 9110 8.8.3.2): opaque tags equal, W/ ignored.
        return bool(stored) and stored[0] in _tags(if_none_match)
    if if_modified_since is not None and last_modified is not None:
        since, modified = http_date(if_modified_since), http_date(last_modified)
        if since is not None and modified is not None:
            return modified <= since
    return False


def updated_headers(
    stored: Iterable[tuple[str, str]], fresh: Iterable[tuple[str, str]]
) -> tuple[tuple[str, str], ...]:
    """A stored response's headers after a 304: each field the 304 carries replaces the
    stored lines of that name (RFC 9111 3.2), framing fields excepted."""
    incoming = [(n, v) for n, v in fresh if n.lower() not in _NOT_UPDATED]
    replaced = {n.lower() for n, _ in incoming}
    kept = [(n, v) for n, v in stored if n.lower() not in replaced]
    return (*kept, *incoming)
