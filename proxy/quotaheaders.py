"""What an upstream says is left of its quota (`X-RateLimit-Remaining`, Twelve Data's
`api-credits-left`), read as a value: which window it counts, and how many calls that
window has then used. Header values are untrusted: digits only, bounded."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from proxy.confnode import Node
from proxy.quota import Window, parse_unit

_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")  # an RFC 9110 5.1 token, bounded
_DIGITS: Final = 12  # more digits than this is not a count or a time we believe
_EPOCH: Final = 1_000_000_000  # a reset at or above this is a Unix time, below: seconds


@dataclass(frozen=True, slots=True)
class Reported:
    """An answer's report: `used` calls counted in `window` (its limit less what is left);
    for a sliding window, `resets_in` seconds until they leave it (None: not said)."""

    window: Window
    used: int
    resets_in: float | None = None


@dataclass(frozen=True, slots=True)
class QuotaHeaders:
    """`quota_headers`: the response header saying how many calls are left (`remaining`),
    optionally the one saying when the window resets (`reset`: seconds from now, or a Unix
    time), and the `rate_limit` window they describe."""

    remaining: str
    window: Window
    reset: str = ""

    @staticmethod
    def parse(node: Node, windows: tuple[Window, ...]) -> QuotaHeaders | None:
        """`{remaining: X-RateLimit-Remaining, reset: X-RateLimit-Reset, window: day}`;
        `window` (a unit of one of the `rate_limit` windows) may be left out when there
        is only one. Errors name the field."""
        if not node.present():
            return None
        node.mapping(("remaining", "reset", "window"))
        names = {}
        for field in ("remaining", "reset"):
            child = node.child(field)
            names[field] = child.text("")
            if names[field] and not _NAME.match(names[field]):
                raise child.error(f"expected a header name, got {names[field]!r}")
        if not names["remaining"]:
            raise node.child("remaining").error("is required (the header saying what is left)")
        if not windows:
            raise node.error("needs a rate_limit: the window the headers describe")
        unit_node = node.child("window")
        if not unit_node.present():
            if len(windows) > 1:
                units = ", ".join(w.unit for w in windows)
                raise unit_node.error(f"is required with several windows (one of {units})")
            return QuotaHeaders(names["remaining"], windows[0], names["reset"])
        unit = parse_unit(unit_node.text())
        matching = [w for w in windows if w.unit == unit]
        if not matching:
            units = ", ".join(w.unit for w in windows)
            raise unit_node.error(f"expected the unit of a rate_limit window ({units})")
        return QuotaHeaders(names["remaining"], matching[0], names["reset"])

    def read(self, headers: Mapping[str, str], now: float) -> Reported | None:
        """The report in a response's headers, or None when there is none we can believe
        (absent, not a plain count, or no fewer calls left than the window allows)."""
        remaining = _count(headers.get(self.remaining))
        if remaining is None or remaining >= self.window.calls:
            return None
        resets_in = None
        if self.window.sliding and (reset := _count(headers.get(self.reset))) is not None:
            seconds = float(reset) if reset < _EPOCH else reset - now
            if 0 <= seconds < 1:
                # Gone within a second: nothing to hold back, and re-counting a whole window
                # on every answer (`Reset: 0`) would be work for nothing.
                return None
            if 0 <= seconds <= self.window.period:  # else: not this window's, ignored
                resets_in = seconds
        return Reported(self.window, self.window.calls - remaining, resets_in)


def _count(value: str | None) -> int | None:
    """A non-negative integer written in ASCII digits (surrounding blanks allowed), or None."""
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > _DIGITS or not (value.isascii() and value.isdigit()):
        return None
    return int(value)
