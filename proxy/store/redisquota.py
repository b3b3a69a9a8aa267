"""Upstream quotas counted in Redis for the whole fleet: one script call per admission.

Keys, under the store's prefix: `quota:<upstream>:<window>` (`1s`, `1min`, `1h`) is a sorted
set of reserved start times, trimmed by the script to the last `calls` of them;
`quota:<upstream>:1day:<day start>` counts one day's calls and expires after its reset;
`quota:<upstream>:pause` holds the time a 429's Retry-After ends. Sliding windows count by
Redis's own clock (TIME), so instances whose clocks disagree still agree on every window,
unless the caller passes a time (tests, to move time without sleeping). The day a call
counts in is this instance's: its wall clock picks the day's key and the time to the reset,
so instances whose clocks are apart disagree only that far around the reset.
"""

from __future__ import annotations

import itertools
import math
import uuid
from typing import Final

from redis.asyncio import Redis

from proxy.quota import Admitted, Answer, QuotaAsk, QuotaReport, Refused

# KEYS[1]: the pause; KEYS[1 + i]: window i. ARGV: now ('' = Redis TIME), max_wait,
# until_reset, token, then per window: kind ('s' sliding, 'd' day), calls, period; then,
# optionally, per window what was spent alone (QuotaAsk.spent: a count, then its numbers).
# Returns {0, wait, used...} (admitted: a slot reserved in every window), {1, retry_after,
# used...} (refused: nothing reserved), {2, retry_after} (paused by a 429). Times go out as
# %.17g strings: Lua's own number formatting keeps 14 digits, 0.1 ms at today's epoch.
# Every script starts so: `f` writes a time with all its digits, `now` is ARGV[1] or Redis's
# own clock (TIME).
_NOW: Final = """
local function f(x) return string.format('%.17g', x) end
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

RESERVE: Final = (
    _NOW
    + """
local max_wait, until_reset, token = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local n = #KEYS - 1
-- What the caller spent alone while Redis was unreachable, added before anything else:
-- per window a count m, then m numbers (sliding: seconds since each call started; day: m
-- is 1 and the number is how many calls).
local at = 5 + 3 * n
if #ARGV >= at then
  for i = 1, n do
    local key, kind, period = KEYS[i + 1], ARGV[2 + 3 * i], tonumber(ARGV[4 + 3 * i])
    local m = tonumber(ARGV[at])
    for j = 1, m do
      local v = tonumber(ARGV[at + j])
      if kind == 's' then
        redis.call('ZADD', key, f(now - v), f(now - v) .. ':' .. token .. ':' .. j)
      elseif v > 0 then
        redis.call('INCRBY', key, math.floor(v))
        redis.call('PEXPIRE', key, math.ceil(until_reset * 1000) + 60000)
      end
    end
    local keep = math.ceil((max_wait + period) * 1000) + 1000
    if kind == 's' and m > 0 and redis.call('PTTL', key) < keep then
      redis.call('PEXPIRE', key, keep)
    end
    at = at + m + 1
  end
end
local paused = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if paused > now then return {2, f(paused - now)} end
local slot, used, day_full, has_day = now, {}, false, false
for i = 1, n do
  local key, kind = KEYS[i + 1], ARGV[2 + 3 * i]
  local calls, period = tonumber(ARGV[3 + 3 * i]), tonumber(ARGV[4 + 3 * i])
  if kind == 's' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', f(now - period))
    local held = redis.call('ZCARD', key)
    if held >= calls then
      local edge = redis.call('ZRANGE', key, held - calls, held - calls, 'WITHSCORES')
      slot = math.max(slot, tonumber(edge[2]) + period)
    end
    used[i] = held
  else
    has_day = true
    used[i] = tonumber(redis.call('GET', key) or '0') or 0
    if used[i] >= calls then day_full = true end
  end
end
local wait = slot - now
if day_full then return {1, f(until_reset), unpack(used)} end
-- A call that would go after the reset would count in a day that has not begun.
if wait > max_wait or (has_day and wait >= until_reset) then return {1, f(wait), unpack(used)} end
for i = 1, n do
  local key, kind = KEYS[i + 1], ARGV[2 + 3 * i]
  local calls, period = tonumber(ARGV[3 + 3 * i]), tonumber(ARGV[4 + 3 * i])
  if kind == 's' then
    redis.call('ZADD', key, f(slot), f(slot) .. ':' .. token)
    redis.call('ZREMRANGEBYRANK', key, 0, -calls - 1)
    redis.call('PEXPIRE', key, math.ceil((wait + period) * 1000) + 1000)
    used[i] = redis.call('ZCARD', key)
  else
    used[i] = redis.call('INCR', key)
    -- Kept a minute past the reset: an instance whose clock lags still finds the day.
    redis.call('PEXPIRE', key, math.ceil(until_reset * 1000) + 60000)
  end
end
return {0, f(wait), unpack(used)}
"""
)

# KEYS[1]: the pause. ARGV: now ('' = Redis TIME), seconds. The later end of a pause wins.
PAUSE: Final = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local seconds = tonumber(ARGV[2])
local ends = now + seconds
if ends > (tonumber(redis.call('GET', KEYS[1]) or '0') or 0) then
  redis.call('SET', KEYS[1], string.format('%.17g', ends), 'PX', math.ceil(seconds * 1000) + 1000)
end
return 0
"""

# KEYS[1]: one window. ARGV: now ('' = Redis TIME), kind ('s' or 'd'), calls, period, used,
# expires, until_reset, token. Raises the window's count to at least `used` (what the
# upstream says it counted), never lowers it; sliding: the calls added leave the window
# `expires` seconds from now. Returns the count.
LEARN: Final = (
    _NOW
    + """
local key, kind, calls, period = KEYS[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local used, expires = math.min(tonumber(ARGV[5]), calls), tonumber(ARGV[6])
local until_reset, token = tonumber(ARGV[7]), ARGV[8]
if kind == 'd' then
  local held = tonumber(redis.call('GET', key) or '0') or 0
  if held >= used then return held end
  redis.call('SET', key, used, 'PX', math.ceil(until_reset * 1000) + 60000)
  return used
end
redis.call('ZREMRANGEBYSCORE', key, '-inf', f(now - period))
local held = redis.call('ZCARD', key)
if held >= used then return held end
local at = now + expires - period
local batch = {}
for i = held + 1, used do  -- one ZADD per thousand calls, not one per call
  batch[#batch + 1] = f(at)
  batch[#batch + 1] = f(at) .. ':' .. token .. ':' .. i
  if #batch >= 2000 or i == used then
    redis.call('ZADD', key, unpack(batch))
    batch = {}
  end
end
redis.call('ZREMRANGEBYRANK', key, 0, -calls - 1)
local ttl = math.ceil(period * 1000) + 1000
if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
return redis.call('ZCARD', key)
"""
)

_MAX_SECONDS: Final = 2 * 86400.0  # no answer of the script means a longer wait than this


class RedisQuota:
    """The scripts, bound to one client and key prefix."""

    def __init__(self, client: Redis, prefix: str) -> None:
        self.prefix = prefix + "quota:"
        self._reserve = client.register_script(RESERVE)
        self._pause = client.register_script(PAUSE)
        self._learn = client.register_script(LEARN)
        self._tokens = itertools.count()
        self._instance = uuid.uuid4().hex[:12]  # tokens tell apart calls reserved at one time

    def keys(self, upstream: str, ask: QuotaAsk) -> list[str]:
        """The pause key, then one key per window."""
        base = f"{self.prefix}{upstream}:"
        windows = [
            base + w.label if w.sliding else f"{base}{w.label}:{int(ask.day_start)}"
            for w in ask.windows
        ]
        return [base + "pause", *windows]

    async def reserve(self, upstream: str, ask: QuotaAsk) -> Answer:
        """Reserve a slot in every window or in none (one round trip)."""
        args: list[str | float | int] = [
            "" if ask.now is None else repr(ask.now), repr(ask.max_wait),
            repr(ask.until_reset), f"{self._instance}:{next(self._tokens)}",
        ]  # fmt: skip
        for w in ask.windows:
            args += ["s" if w.sliding else "d", w.calls, repr(w.period if w.sliding else 0.0)]
        if len(ask.spent) == len(ask.windows):
            for spent in ask.spent:
                args += [len(spent), *map(repr, spent)]
        reply = await self._reserve(keys=self.keys(upstream, ask), args=args)
        return _answer(reply, len(ask.windows))

    async def pause(self, upstream: str, seconds: float, now: float | None) -> None:
        """Pause the upstream for every instance, unless a longer pause is on."""
        key = f"{self.prefix}{upstream}:pause"
        await self._pause(keys=[key], args=["" if now is None else repr(now), repr(seconds)])

    async def learn(self, upstream: str, report: QuotaReport) -> None:
        """Raise one window's fleet-wide count to what the upstream said it counted."""
        w = report.window
        key = f"{self.prefix}{upstream}:{w.label}"
        if not w.sliding:
            key += f":{int(report.day_start)}"
        args: list[str | float | int] = [
            "" if report.now is None else repr(report.now), "s" if w.sliding else "d",
            w.calls, repr(w.period if w.sliding else 0.0), report.used, repr(report.expires),
            repr(report.until_reset), f"{self._instance}:{next(self._tokens)}",
        ]  # fmt: skip
        await self._learn(keys=[key], args=args)


def _answer(reply: object, windows: int) -> Answer:
    """The script's reply as a value; anything else Redis might hold or say is refused."""
    if not isinstance(reply, list) or len(reply) < 2:
        raise ValueError(f"unexpected quota reply {reply!r}")
    try:
        code, seconds = int(reply[0]), float(reply[1])
        used = tuple(int(n) for n in reply[2 : 2 + windows])
    except (TypeError, ValueError) as e:  # a nested list, a nil: not the script's
        raise ValueError(f"unexpected quota reply {reply!r:.80}") from e
    if not 0.0 <= seconds <= _MAX_SECONDS:  # NaN too
        seconds = _MAX_SECONDS if not math.isnan(seconds) else 0.0
    if code == 0:
        return Admitted(seconds, used)
    return Refused(seconds, paused=code == 2, used=used)
