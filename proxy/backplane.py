"""Backplane: purges, clears and writes broadcast over Redis pub/sub to every instance."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from redis.asyncio import Redis
from redis.exceptions import RedisError

from proxy.config import RedisConfig
from proxy.stamp import parse_stamp

log = logging.getLogger(__name__)
CHANNEL = "events"
# "alive": an instance announcing itself (proxy/fleet.py), with no argument.
Op = Literal["set", "del", "match", "clear", "ban", "softban", "unban", "alive"]
_OPS: frozenset[str] = frozenset(
    {"set", "del", "match", "clear", "ban", "softban", "unban", "alive"}
)
MAX_ORIGIN: Final = 64  # an instance id is 12 hex digits; a longer origin is not one of ours
_PING_EVERY = 2.0  # seconds between liveness pings on the subscription
_DEAD_AFTER = 3 * _PING_EVERY  # silence (not even a pong) after which we reconnect


@dataclass(frozen=True, slots=True)
class Event:
    """One change another instance must apply to its L1: `arg` is a key or a glob."""

    op: Op
    arg: str
    origin: str  # the sending instance; an instance ignores its own events
    # "set": the entry's stored_at, so only older copies are dropped; "ban": when purged
    stamp: float = 0.0

    def encode(self) -> bytes:
        body = {"op": self.op, "arg": self.arg, "origin": self.origin, "stamp": self.stamp}
        return json.dumps(body).encode()

    @staticmethod
    def decode(data: bytes) -> Event | None:
        """The event in a message, or None for anything that is not one of ours."""
        try:
            body = json.loads(data)
            op, arg, origin = body["op"], body["arg"], body["origin"]
            stamp = parse_stamp(body.get("stamp", 0.0))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return None  # RecursionError: `[[[[...` escaped, and ended the subscription
        if not all(isinstance(v, str) for v in (op, arg, origin)) or op not in _OPS:
            return None
        if stamp is None:  # not a finite time (1e999, 10**400, "1", true)
            return None
        if len(origin) > MAX_ORIGIN:
            return None
        if op == "alive" and (arg or not origin):
            return None
        return Event(op, arg, origin, stamp)


class Backplane:
    """Keeps one subscription open; calls `on_event` for other instances' events and
    `on_resync` after every reconnect, because messages sent meanwhile are lost."""

    def __init__(
        self,
        config: RedisConfig,
        instance: str,
        on_event: Callable[[Event], None],
        on_resync: Callable[[], None],
        on_subscribed: Callable[[], object] | None = None,
        on_connection: Callable[[bool], object] | None = None,
    ) -> None:
        self.config = config
        self.instance = instance
        self.on_event = on_event
        self.on_resync = on_resync
        self.on_subscribed = on_subscribed
        self.on_connection = on_connection  # told True on each subscribe, False on each loss
        self.connected = False
        self.received = 0
        self.failed = 0  # messages whose handling raised (skipped)
        self.reconnects = 0
        self.channel = config.key_prefix + CHANNEL

    async def run(self) -> None:
        """Subscribe, dispatch, and on any failure reconnect with capped backoff. Forever."""
        backoff = self.config.breaker_backoff
        first = True
        while True:
            client: Redis = Redis.from_url(
                self.config.url,
                socket_connect_timeout=self.config.connect_timeout,
                socket_timeout=_DEAD_AFTER,
                decode_responses=False,
            )
            try:
                await self._listen(client, first)
            except (RedisError, OSError, TimeoutError) as e:
                if self.connected:
                    log.warning("backplane lost its subscription: %s", e)
                    backoff = self.config.breaker_backoff  # it worked: start over
                elif first:
                    log.warning("backplane cannot subscribe yet: %s", e)
            except Exception:  # a bug must not deafen the instance for good: start over
                log.exception("backplane failed; reconnecting (and resyncing)")
            finally:
                if self.connected and self.on_connection is not None:
                    self.on_connection(False)
                self.connected = False
                await _close_quietly(client)
            if (task := asyncio.current_task()) is not None and task.cancelling():
                # redis-py turns our cancellation into a ConnectionError when the connection
                # drops at the same moment: we were told to stop, so stop.
                raise asyncio.CancelledError
            first = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.config.breaker_max_backoff)

    async def _listen(self, client: Redis, first: bool) -> None:
        pubsub = client.pubsub()
        async with asyncio.timeout(self.config.connect_timeout + _DEAD_AFTER):
            await pubsub.subscribe(self.channel)
            while (await pubsub.get_message(timeout=_DEAD_AFTER)) is None:
                pass  # wait for the subscribe confirmation
        self.connected = True
        if self.on_connection is not None:
            self.on_connection(True)
        if not first:
            self.reconnects += 1
            self.on_resync()
        elif self.on_subscribed is not None:
            self.on_subscribed()  # e.g. read state published before we listened
        last_seen = last_ping = time.monotonic()
        while True:
            message = await pubsub.get_message(timeout=_PING_EVERY / 2)
            now = time.monotonic()
            if message is not None:
                last_seen = now
                self._dispatch_safely(message)
            elif now - last_seen > _DEAD_AFTER:
                raise TimeoutError("no answer on the subscription (hung or partitioned Redis)")
            if now - last_ping > _PING_EVERY:
                await pubsub.ping()
                last_ping = now

    def _dispatch_safely(self, message: dict[str, Any]) -> None:
        """Handle one message; whatever it raises skips that message only. Anyone who can
        PUBLISH on Redis chooses the bytes: the traceback is logged once, then a line each."""
        try:
            self._dispatch(message)
        except Exception as e:
            self.failed += 1
            if self.failed == 1:
                log.exception("skipping a backplane message that could not be handled")
            else:
                log.warning("skipping a failing backplane message (%d so far): %r", self.failed, e)

    def _dispatch(self, message: dict[str, Any]) -> None:
        if message.get("type") != "message":
            return  # pong, subscribe confirmations
        data = message.get("data")
        event = Event.decode(data) if isinstance(data, bytes) else None
        if event is None:
            log.warning("ignoring a malformed backplane message")
            return
        if event.origin == self.instance:
            return
        self.received += 1
        try:
            self.on_event(event)
        except Exception:  # a bug in applying one event must not deafen the instance
            log.exception("applying backplane event %s failed", event)


async def _close_quietly(client: Redis) -> None:
    with contextlib.suppress(RedisError, OSError):
        await client.aclose()
