"""Times other instances and Redis hand us (backplane stamps, ban records): untrusted."""

from __future__ import annotations

import math


def parse_stamp(value: object) -> float | None:
    """A time in epoch seconds from a decoded JSON number, as a finite float; None for
    anything else: not a number (strings, booleans, null), infinite or NaN (JSON's 1e999),
    or an integer too big for a float (10**400, whose conversion raises OverflowError)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        stamp = float(value)
    except OverflowError:
        return None
    return stamp if math.isfinite(stamp) else None
