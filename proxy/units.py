"""Durations, sizes and ${VAR} expansion, read the way people write them."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|kib|mib|gib|k|m|g)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "k": 1024, "kb": 1024, "kib": 1024,
    "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1024**3, "gib": 1024**3,
}  # fmt: skip
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def parse_duration(value: object) -> float:
    """Seconds from 300, 300s, 5m, 1h, 1.5d or 250ms; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"must not be negative: {value!r}")
        try:
            return _finite(float(value), value)
        except OverflowError:  # an int beyond any float
            raise ValueError(f"too large: {value!r}") from None
    if isinstance(value, str) and (m := _DURATION.match(value)):
        return _finite(float(m.group(1)) * _DURATION_UNITS[m.group(2)], value)
    raise ValueError(f"not a duration (try 300, 300s, 5m, 1h): {value!r}")


def _finite(number: float, value: object) -> float:
    # NaN, infinity and overflowing numbers (`.inf`, 400 digits) would break every
    # comparison and expiry computed from them.
    if not math.isfinite(number):
        raise ValueError(f"not a finite number: {value!r}")
    return number


def parse_size(value: object) -> int:
    """Bytes from 1048576, 512KB, 100MB or 1GB (binary multiples); ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must not be negative: {value!r}")
        return value
    if isinstance(value, str) and (m := _SIZE.match(value)):
        unit = (m.group(2) or "b").lower()
        return int(_finite(float(m.group(1)) * _SIZE_UNITS[unit], value))
    raise ValueError(f"not a size (try 1048576, 512KB, 100MB): {value!r}")


def expand_env(text: str, env: Mapping[str, str] | None = None) -> str:
    """Replace ${VAR} and ${VAR:-default}; an unset VAR without default is an error."""
    source = os.environ if env is None else env

    def substitute(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        value = source.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise KeyError(name)
            return default
        return value

    return _ENV.sub(substitute, text)
