"""L2: Redis through redis-py's asyncio client. Every Redis problem is StoreUnavailable."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.clock import Clock, system_clock
from proxy.config import RedisConfig
from proxy.entry import CachedResponse, decode, encode
from proxy.errors import CorruptEntry, StoreUnavailable
from proxy.glob import Glob
from proxy.keys import escape_glob
from proxy.popularity import POPULAR_KEEP, countable
from proxy.quota import Answer, QuotaAsk, QuotaReport
from proxy.store.base import StoreStats
from proxy.store.redisquota import RedisQuota
from proxy.tasks import Tasks
from proxy.walk import sliced

log = logging.getLogger(__name__)
T = TypeVar("T")
_SCAN_BATCH = 500
# The longest glob Redis's SCAN MATCH is handed whole. Redis's matcher costs up to
# len(key) * len(glob) per key: over 500 keys of 8 KB, one SCAN took 300 ms for a dense
# 64-character glob, 62 ms at most for 16 characters, against 8-14 ms for `*` or `* * /v8/*`
# (redis-server 7.0, this machine). Longer globs reach Redis as their literal prefix only.
REDIS_GLOB = 16
_MGET_BATCH = 100  # keys per batched read
POOL_SIZE = 8  # connections to Redis at most (the backplane has one more of its own)
# Compare-and-delete: remove a key only if it still holds the given value (a lease we
# own, a corrupt value we read).
_DROP_IF_SAME = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)


@dataclass(frozen=True, slots=True)
class _Corrupt:
    raw: bytes
    reason: str


_Read = CachedResponse | _Corrupt | None


def _decode(raw: bytes | None, now: float | None = None) -> _Read:
    if raw is None:
        return None
    try:
        return decode(raw, now)
    except CorruptEntry as e:
        return _Corrupt(raw, str(e))


class RedisStore:
    """A `PagedStore` and the `Shared` one: entries under `<prefix>e:<key>`, leases under
    `<prefix>lease:<key>`, a popularity sorted set at `<prefix>popular`, ban records in the
    hash `<prefix>bans`, messages on `<prefix>events`. Concurrent gets in one event-loop tick
    share one MGET, because redis-py spends ~100 us of CPU per command (issue 3, L2
    throughput)."""

    def __init__(
        self,
        config: RedisConfig,
        tasks: Tasks,
        clock: Clock = system_clock,
        client: Redis | None = None,
    ) -> None:
        self.config = config
        self.stats = StoreStats()
        self.client: Redis = client or Redis.from_pool(
            BlockingConnectionPool.from_url(
                config.url,
                # A burst of misses (each takes a lease, each write is a SET) would otherwise
                # open one connection per concurrent command and keep them all for good.
                # Commands beyond this wait for a connection, within _call's deadline.
                max_connections=POOL_SIZE,
                timeout=None,
                socket_timeout=config.command_timeout,
                socket_connect_timeout=config.connect_timeout,
                retry=Retry(NoBackoff(), 0),  # the breaker decides when to try again
                decode_responses=False,
            )
        )
        self.entries = config.key_prefix + "e:"
        self.leases = config.key_prefix + "lease:"
        self.popular = config.key_prefix + "popular"
        self.bans = config.key_prefix + "bans"
        self.quota = RedisQuota(self.client, config.key_prefix)
        self._tasks = tasks
        self._clock = clock
        self._pending: dict[str, list[asyncio.Future[_Read]]] = {}
        self._flush_scheduled = False

    @property
    def reaches_others(self) -> bool:
        """Every instance with this Redis and prefix sees it."""
        return True

    async def _call(self, awaitable: Awaitable[T]) -> T:
        """Run one Redis command under the command timeout; failures become StoreUnavailable."""
        try:
            async with asyncio.timeout(self.config.command_timeout + self.config.connect_timeout):
                return await awaitable
        except (RedisError, OSError, TimeoutError) as e:
            self.stats.errors += 1
            raise StoreUnavailable(f"redis: {type(e).__name__}: {e}") from e

    async def get(self, key: str) -> CachedResponse | None:
        """The entry under key; None when absent, expired, or not decodable (then deleted)."""
        future: asyncio.Future[_Read] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(key, []).append(future)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        read = await future
        if isinstance(read, _Corrupt):
            self.stats.corrupt += 1
            self.stats.misses += 1
            log.warning("dropping undecodable L2 value for %s: %s", key, read.reason)
            # Awaited, so the refetch this miss causes cannot be written first and then
            # dropped; compare-and-delete, so a good value written meanwhile survives.
            with contextlib.suppress(StoreUnavailable):
                await self._call(self.client.eval(_DROP_IF_SAME, 1, self.entries + key, read.raw))
            return None
        if read is None or read.keep_until <= self._clock():
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        return read

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        keys = list(pending)
        # Bounded batches: one huge MGET could blow the command timeout for every key in it.
        for start in range(0, len(keys), _MGET_BATCH):
            batch = {k: pending[k] for k in keys[start : start + _MGET_BATCH]}
            self._tasks.spawn(self._mget(batch), "l2-mget")

    async def _mget(self, pending: dict[str, list[asyncio.Future[_Read]]]) -> None:
        keys = list(pending)
        try:
            values = cast(
                list[bytes | None],
                await self._call(self.client.mget([self.entries + k for k in keys])),
            )
        except StoreUnavailable as e:
            for futures in pending.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(e)
            return
        now = self._clock()
        for key, raw in zip(keys, values, strict=True):
            read = _decode(raw, now)  # once per key, however many requests wait for it
            for future in pending[key]:
                if not future.done():
                    future.set_result(read)

    async def set(self, key: str, entry: CachedResponse) -> None:
        """Store with a Redis-side expiry at the entry's end of life."""
        ttl_ms = int((entry.keep_until - self._clock()) * 1000)
        if ttl_ms <= 0:
            return
        await self._call(self.client.set(self.entries + key, encode(entry), px=ttl_ms))
        self.stats.sets += 1

    async def delete(self, key: str) -> bool:
        """Remove key; True if it was there."""
        removed = int(await self._call(self.client.unlink(self.entries + key)))
        self.stats.deletes += removed
        return removed > 0

    async def delete_matching(self, pattern: str) -> int:
        """SCAN in batches and UNLINK what matches: never KEYS, never blocks Redis."""
        removed = 0
        async for batch in self._scan_batches(Glob.parse(pattern, max_length=None)):
            removed += int(await self._call(self.client.unlink(*batch)))
        self.stats.deletes += removed
        return removed

    async def clear(self) -> int:
        """Remove every entry under this prefix (not the whole database: it may be shared)."""
        return await self.delete_matching("*")

    async def scan(self, pattern: str = "*") -> AsyncIterator[tuple[str, CachedResponse]]:
        """Live decodable entries whose key matches the glob."""
        now = self._clock()
        async for batch in self._scan_batches(Glob.parse(pattern, max_length=None)):
            values = cast(list[bytes | None], await self._call(self.client.mget(batch)))
            for full_key, raw in zip(batch, values, strict=True):
                if raw is None:
                    continue
                try:
                    entry = decode(raw)
                except CorruptEntry:
                    continue
                if entry.keep_until > now:
                    yield full_key[len(self.entries) :].decode(), entry

    async def scan_page(
        self, pattern: str, cursor: int, count: int
    ) -> tuple[int, list[tuple[str, CachedResponse]]]:
        """One SCAN step over entries matching the glob, with their decoded values; the next
        cursor (0 when done). Never KEYS: each step is bounded. It may find none, and the
        walk still goes on."""
        glob = Glob.parse(pattern, max_length=None)  # bounded upstream
        next_cursor, keys = await self._scan(glob, cursor, count)
        if not keys:
            return next_cursor, []
        values = cast(list[bytes | None], await self._call(self.client.mget(keys)))
        now = self._clock()
        found: list[tuple[str, CachedResponse]] = []
        for full_key, raw in zip(keys, values, strict=True):
            read = _decode(raw)
            if isinstance(read, CachedResponse) and read.keep_until > now:
                found.append((full_key[len(self.entries) :].decode(), read))
        return next_cursor, found

    async def exists_many(self, keys: list[str]) -> list[bool]:
        """Which of these entry keys L2 holds (one pipelined round trip)."""
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(self.entries + key)
        return [bool(n) for n in await self._call(pipe.execute())]

    async def _scan_batches(self, glob: Glob) -> AsyncIterator[list[bytes]]:
        cursor = 0
        while True:
            cursor, keys = await self._scan(glob, cursor, _SCAN_BATCH)
            if keys:
                yield keys
            if cursor == 0:
                return

    async def _scan(self, glob: Glob, cursor: int, count: int) -> tuple[int, list[bytes]]:
        """One SCAN step: the next cursor and the entry keys in it that the glob matches.

        Redis matches in its one thread, and a dense glob costs up to len(key) * len(glob)
        per key: 200 keys of 8 KB took one SCAN 2.75 s, holding every instance's Redis (issue
        11 review, finding 8). So Redis gets the glob itself only when it is short (then at
        most len(key) * REDIS_GLOB per key, see there); a longer one, only its literal
        prefix and `*`.
        Either way the glob is matched here too, in slices of time, on what Redis returns.
        Admin's globs all start `* * `: handed only their prefix, Redis sent every key here
        (100k keys: 0.50 s against 0.07 s; issue 11 second review, finding 3)."""
        if len(glob.text) <= REDIS_GLOB:
            match = escape_glob(self.entries) + glob.text
        else:
            match = escape_glob(self.entries + glob.literal_prefix) + "*"
        next_cursor, keys = cast(
            tuple[int, list[bytes]],
            await self._call(self.client.scan(cursor=cursor, match=match, count=count)),
        )
        start = len(self.entries.encode())
        matched = [
            k async for k in sliced(keys) if glob.matches(k[start:].decode(errors="replace"))
        ]
        return next_cursor, matched

    async def acquire_lease(self, key: str, owner: str, seconds: float) -> bool:
        """SET NX PX: True if this owner now holds the right to fetch key."""
        ms = max(1, int(seconds * 1000))
        return bool(await self._call(self.client.set(self.leases + key, owner, nx=True, px=ms)))

    async def lease_held(self, key: str) -> bool:
        """Whether some instance holds the lease on key."""
        return bool(await self._call(self.client.exists(self.leases + key)))

    async def release_lease(self, key: str, owner: str) -> None:
        """Give the lease back, if it is still ours."""
        await self._call(self.client.eval(_DROP_IF_SAME, 1, self.leases + key, owner))

    async def add_popularity(self, counts: Mapping[str, int]) -> None:
        """Add request counts to the popularity set and trim it back to its bound, the least
        requested going first: one pipeline, one round trip. The set never holds more than
        POPULAR_KEEP keys after a flush, nor a key longer than MAX_KEY_LENGTH."""
        counted = {key: n for key, n in counts.items() if countable(key)}
        if not counted:
            return
        pipe = self.client.pipeline(transaction=False)
        for key, count in counted.items():
            pipe.zincrby(self.popular, count, key)
        # O(log n + removed): at most one flush's worth of keys goes at a time.
        pipe.zremrangebyrank(self.popular, 0, -POPULAR_KEEP - 1)
        await self._call(pipe.execute())

    async def hottest(self, n: int) -> list[tuple[str, float]]:
        """The n most requested keys, busiest first, with their estimated request counts."""
        rows = cast(
            list[tuple[bytes, float]],
            await self._call(self.client.zrevrange(self.popular, 0, n - 1, withscores=True)),
        )
        return [(k.decode(), float(score)) for k, score in rows]

    async def save_bans(self, records: Mapping[str, bytes], forget: Sequence[str]) -> None:
        """Keep purges where new and reconnecting instances will find them, and drop those
        no longer needed: one round trip."""
        pipe = self.client.pipeline(transaction=False)
        if records:
            pipe.hset(self.bans, mapping=cast(Any, records))  # redis' Mapping is invariant
        if forget:
            pipe.hdel(self.bans, *forget)
        await self._call(pipe.execute())

    async def load_bans(self) -> dict[bytes, bytes]:
        """Every tag purge on record."""
        return cast(dict[bytes, bytes], await self._call(self.client.hgetall(self.bans)))

    async def publish(self, channel: str, message: bytes) -> None:
        """Send one backplane message."""
        await self._call(self.client.publish(self.config.key_prefix + channel, message))

    async def reserve_quota(self, upstream: str, ask: QuotaAsk) -> Answer:
        """Reserve a slot in every window of the upstream's fleet-wide quota, or in none."""
        try:
            return await self._call(self.quota.reserve(upstream, ask))
        except ValueError as e:  # a reply that is not the script's: Redis is not ours to trust
            self.stats.errors += 1
            raise StoreUnavailable(f"redis: {e}") from e

    async def pause_quota(self, upstream: str, seconds: float, now: float | None) -> None:
        """Pause the upstream for every instance (a 429's Retry-After)."""
        await self._call(self.quota.pause(upstream, seconds, now))

    async def learn_quota(self, upstream: str, report: QuotaReport) -> None:
        """Raise a window's fleet-wide count to what the upstream reported."""
        await self._call(self.quota.learn(upstream, report))

    async def close(self) -> None:
        """Close the connection pool."""
        await self.client.aclose()
