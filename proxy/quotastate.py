"""Quota counts that survive a restart, for an instance counting alone (memory backend; a
shared backend's counts live in Redis). One small JSON file in `server.state_dir`:

    {"version": 1, "upstreams": {"api": {"day": [start, end, used],
                                         "sliding": {"1min": [wall time, ...]}}}}

Written atomically (temp file, then os.replace) at most once per `every` seconds when a
count changed, and at shutdown. Read once at start, as untrusted input: a missing file is
a fresh budget; an unreadable, oversized or malformed one (or one upstream's malformed
entry) is logged and its windows count as spent until their reset, since overspending a
quota can get the key banned while stale copies still serve. Counts are calls made, so they
apply to whatever the limits are now: a day's count carries over when its saved day
overlaps the current one (same reset: the same day; an earlier day is dropped), sliding
calls by window unit (1s, 1min, 1h), still inside their span.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

from proxy.clock import Clock, system_clock
from proxy.quota import MAX_DAILY, LocalQuota
from proxy.tasks import Tasks

log = logging.getLogger(__name__)

VERSION: Final = 1
FILE_NAME: Final = "quota.json"
MAX_BYTES: Final = 1 << 20  # a file larger than this was not written by us
MAX_STARTS: Final = 1000  # sliding calls kept per window (larger windows: the last ones)
_MAX_DAY: Final = 26 * 3600.0  # a day is 23 to 25 hours long across a DST change
_MAX_AGE: Final = 400 * 86400.0  # a time this far from now is not one we wrote

Quotas = Mapping[str, LocalQuota]


def state_directory(configured: str, environ: Mapping[str, str]) -> Path:
    """`server.state_dir`, else $XDG_STATE_HOME/cacheproxy (~/.local/state/cacheproxy)."""
    if configured:
        return Path(configured).expanduser()
    base = environ.get("XDG_STATE_HOME") or str(Path("~/.local/state").expanduser())
    return Path(base) / "cacheproxy"


def encode(quotas: Quotas) -> bytes:
    """The state of every quota with windows, as the file holds it."""
    upstreams: dict[str, object] = {}
    for name, quota in quotas.items():
        entry: dict[str, object] = {}
        if any(not w.sliding for w in quota.windows):
            entry["day"] = list(quota.day())
        sliding = {w.label: quota.held(w)[-MAX_STARTS:] for w in quota.windows if w.sliding}
        if sliding:
            entry["sliding"] = sliding
        if entry:
            upstreams[name] = entry
    return json.dumps({"version": VERSION, "upstreams": upstreams}).encode()


def restore(data: bytes, quotas: Quotas, now: float) -> list[str]:
    """Apply a saved state to these quotas (`now`: wall time). Returns the upstreams whose
    entry was malformed, each with why (their windows are now spent); raises ValueError when
    the file as a whole is (nothing was applied)."""
    if len(data) > MAX_BYTES:
        raise ValueError(f"larger than {MAX_BYTES} bytes")
    try:
        state = json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError too
        raise ValueError(f"not JSON: {e}") from e
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise ValueError(f"not a version {VERSION} quota state")
    upstreams = state.get("upstreams")
    if not isinstance(upstreams, dict):
        raise ValueError("no upstreams mapping")
    problems = []
    for name, quota in quotas.items():
        if (entry := upstreams.get(name)) is None:
            continue  # not counted before (a new upstream, or a first start)
        try:
            _apply(entry, quota, now)
        except ValueError as e:
            quota.spend()
            problems.append(f"{name}: {e}")
    return problems


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number we wrote")


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what}: expected a number, got {value!r:.40}")
    try:
        number = float(value)  # an int of 400 digits does not fit: OverflowError
    except OverflowError:
        raise ValueError(f"{what}: a number too large") from None
    if not math.isfinite(number):
        raise ValueError(f"{what}: expected a number, got {value!r:.40}")
    return number


def _apply(entry: object, quota: LocalQuota, now: float) -> None:
    """One upstream's saved counts onto its quota; ValueError names what is malformed."""
    if not isinstance(entry, dict):
        raise ValueError("entry is not a mapping")
    if (day := entry.get("day")) is not None:
        if not isinstance(day, list) or len(day) != 3:
            raise ValueError("day: expected [start, end, used]")
        start, end = _number(day[0], "day start"), _number(day[1], "day end")
        used = day[2]
        if isinstance(used, bool) or not isinstance(used, int) or not 0 <= used <= MAX_DAILY:
            raise ValueError(f"day used: expected a count, got {used!r:.40}")
        if not 0 < end - start <= _MAX_DAY or abs(start - now) > _MAX_AGE:
            raise ValueError("day: not a day around now")
        current_start, current_end, _ = quota.day()
        # The calls it counted may lie in today (a changed quota_reset overlaps days): kept.
        if start < current_end and end > current_start:
            for window in quota.windows:
                if not window.sliding:
                    quota.raise_used(window, used)
    sliding = entry.get("sliding", {})
    if not isinstance(sliding, dict):
        raise ValueError("sliding: expected a mapping")
    by_label = {w.label: w for w in quota.windows if w.sliding}
    for label, starts in sliding.items():
        if not isinstance(starts, list) or len(starts) > MAX_STARTS:
            raise ValueError(f"sliding {label:.20}: expected at most {MAX_STARTS} times")
        times = [_number(t, f"sliding {label:.20}") for t in starts]
        if (kept := by_label.get(label)) is None:
            continue  # a window no longer configured
        if any(t > now + kept.period for t in times):
            raise ValueError(f"sliding {label}: a call time in the future")
        quota.hold(kept, [t for t in times if t > now - kept.period])


class QuotaStateFile:
    """The state file of `quotas()` (read again at each save: a reload may replace them)."""

    def __init__(
        self, directory: Path, quotas: Callable[[], Quotas], wall: Clock = system_clock
    ) -> None:
        self.path = directory / FILE_NAME
        self._quotas = quotas
        self._wall = wall
        self._saved: dict[str, int] | None = None  # each quota's `changes` when last saved
        self._lock = asyncio.Lock()
        # Its own: the app's tasks are awaited to finish (Tasks.wait), and this one never does.
        self._tasks = Tasks()
        self.failing = False  # the last write failed (logged once until one succeeds)

    async def load(self) -> None:
        """Apply the saved counts, then write the file once, which proves it writable.
        Whatever cannot be read or written leaves its windows spent until their reset."""
        quotas = {name: q for name, q in self._quotas().items() if q.windows}
        try:
            data = await asyncio.to_thread(_read, self.path)
        except FileNotFoundError:
            data = None  # a first start: a fresh budget
        except OSError as e:
            self._spend(quotas, f"cannot read {self.path}: {e.strerror or e}")
            data = None
        if data is not None:
            try:
                problems = restore(data, quotas, self._wall())
            except ValueError as e:
                self._spend(quotas, f"{self.path} is unreadable ({e})")
            else:
                for problem in problems:
                    log.error("quota state %s, %s: windows counted as spent until their "
                              "reset", self.path, problem)  # fmt: skip
        if not await self.save(force=True) and quotas:
            self._spend(quotas, f"cannot write {self.path}, so a restart could not know "
                                "what this run spends")  # fmt: skip

    def _spend(self, quotas: Quotas, why: str) -> None:
        log.error("quota state: %s; every quota window counts as spent until its reset "
                  "(stale copies still serve)", why)  # fmt: skip
        for quota in quotas.values():
            quota.spend()

    async def save(self, force: bool = False) -> bool:
        """Write the file if a count changed since the last write (or `force`); False when
        the write failed (logged once until a write succeeds)."""
        async with self._lock:
            quotas = self._quotas()
            changes = {name: q.changes for name, q in quotas.items()}
            if not force and changes == self._saved:
                return True
            data = encode(quotas)
            try:
                await asyncio.to_thread(_write, self.path, data)
            except OSError as e:
                if not self.failing:
                    log.error("quota state: cannot write %s (%s): counts will not survive a "
                              "restart", self.path, e.strerror or e)  # fmt: skip
                self.failing = True
                return False
            if self.failing:
                log.info("quota state: %s written again", self.path)
            self.failing = False
            self._saved = changes
            return True

    def start(self, every: float = 1.0) -> None:
        """Save every `every` seconds when something changed, in a named background task."""
        self._tasks.spawn(self.run(every), "quota-state")

    async def close(self) -> None:
        """Stop saving in the background, then save the last counts."""
        await self._tasks.close()
        await self.save()

    async def run(self, every: float = 1.0) -> None:
        """Save every `every` seconds when something changed."""
        while True:
            await asyncio.sleep(every)
            # Shielded: a write cut short by shutdown would land after the final one.
            await asyncio.shield(self.save())


def _read(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(MAX_BYTES + 1)  # restore() refuses what is larger


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
