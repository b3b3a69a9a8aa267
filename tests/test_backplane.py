"""proxy/backplane.py: the event encoding, and events crossing a real Redis between instances."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from uuid import uuid4

import pytest
from conftest import eventually

from proxy.backplane import CHANNEL, Backplane, Event
from proxy.clock import ManualClock
from proxy.config import RedisConfig
from proxy.store.redis import RedisStore
from proxy.tasks import Tasks


@pytest.mark.parametrize(
    "event",
    [
        Event("set", "GET:https://example.com/v8/chart/AAPL?range=5d", "inst-1"),
        Event("del", "k", "a"),
        Event("match", "GET:*/chart/[AB]?PL\\*", "b"),
        Event("clear", "*", "c"),
        Event("del", "", ""),
        Event("del", 'quote " and \\ backslash', "ünïcode-ïd"),
        Event("match", "日本/*", "x\ny"),
    ],
)
def test_event_round_trips(event: Event) -> None:
    data = event.encode()
    assert isinstance(data, bytes)
    assert Event.decode(data) == event


def payload(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


# Stamps that are no time: each was refused, or (10**400: OverflowError) ended the listener.
HOSTILE_STAMPS: dict[str, object] = {
    "huge-int": 10**400,  # float() raises OverflowError
    "inf": math.inf,  # json.dumps writes Infinity, which json.loads reads back
    "nan": math.nan,
    "true": True,
    "string": "1700000000",
    "null": None,
    "list": [1],
}


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"\xff\xfe\x00", id="not-utf8"),
        pytest.param(b'{"op": "del", "arg": "k", "origin": "a"', id="truncated"),
        pytest.param(b"null", id="null"),
        pytest.param(b"[]", id="list"),
        pytest.param(b'"del"', id="string"),
        pytest.param(b"42", id="number"),
        pytest.param(payload(arg="k", origin="a"), id="no-op"),
        pytest.param(payload(op="del", origin="a"), id="no-arg"),
        pytest.param(payload(op="del", arg="k"), id="no-origin"),
        pytest.param(payload(op="purge", arg="k", origin="a"), id="unknown-op"),
        pytest.param(payload(op="DEL", arg="k", origin="a"), id="op-case"),
        pytest.param(payload(op=None, arg="k", origin="a"), id="op-null"),
        pytest.param(payload(op=1, arg="k", origin="a"), id="op-number"),
        pytest.param(payload(op=["del"], arg="k", origin="a"), id="op-list"),
        pytest.param(payload(op={"del": 1}, arg="k", origin="a"), id="op-object"),
        pytest.param(payload(op="del", arg=5, origin="a"), id="arg-number"),
        pytest.param(payload(op="del", arg=None, origin="a"), id="arg-null"),
        pytest.param(payload(op="del", arg=["k"], origin="a"), id="arg-list"),
        pytest.param(payload(op="del", arg="k", origin=7), id="origin-number"),
        pytest.param(b"[" * 100_000, id="deeply-nested"),  # RecursionError escaped
        *(
            pytest.param(payload(op="ban", arg="a=1", origin="z", stamp=v), id=f"stamp-{name}")
            for name, v in HOSTILE_STAMPS.items()
        ),
    ],
)
def test_malformed_payload_decodes_to_none(data: bytes) -> None:
    assert Event.decode(data) is None


# --- over a real Redis --------------------------------------------------------------------


@dataclass
class Instance:
    """One backplane and what it was told."""

    backplane: Backplane
    events: list[Event] = field(default_factory=list)
    resyncs: int = 0


@pytest.fixture
async def tasks() -> AsyncIterator[Tasks]:
    t = Tasks()
    yield t
    await t.close()  # cancels the backplanes


def config(url: str, prefix: str) -> RedisConfig:
    return RedisConfig(
        url=url, key_prefix=prefix, command_timeout=1.0, connect_timeout=0.5,
        breaker_backoff=0.02, breaker_max_backoff=0.1,
    )  # fmt: skip


async def start(tasks: Tasks, url: str, prefix: str, name: str) -> Instance:
    instance = Instance(Backplane(config(url, prefix), name, lambda e: None, lambda: None))

    def resync() -> None:
        instance.resyncs += 1

    instance.backplane.on_event = instance.events.append
    instance.backplane.on_resync = resync
    tasks.spawn(instance.backplane.run(), f"backplane-{name}")
    return instance


@pytest.fixture
def prefix() -> str:
    return f"t{uuid4().hex[:8]}:"


@pytest.fixture
async def publisher(redis_server: Any, prefix: str, tasks: Tasks) -> AsyncIterator[RedisStore]:
    store = RedisStore(config(redis_server.url, prefix), tasks, ManualClock())
    yield store
    await store.close()


async def test_an_event_reaches_the_other_instance_and_not_its_sender(
    redis_server: Any, prefix: str, publisher: RedisStore, tasks: Tasks
) -> None:
    a = await start(tasks, redis_server.url, prefix, "a")
    b = await start(tasks, redis_server.url, prefix, "b")
    await eventually(lambda: a.backplane.connected and b.backplane.connected)
    assert a.backplane.channel == b.backplane.channel == prefix + CHANNEL

    from_a = Event("del", "k1", "a")
    from_b = Event("match", "chart:*", "b")
    await publisher.publish(CHANNEL, from_a.encode())
    await publisher.publish(CHANNEL, from_b.encode())
    await eventually(lambda: bool(a.events) and bool(b.events))

    # Messages arrive in order, so by the time a saw b's event it had already seen its own.
    assert a.events == [from_b]
    assert b.events == [from_a]
    assert (a.backplane.received, b.backplane.received) == (1, 1)
    assert (a.resyncs, b.resyncs) == (0, 0)


async def test_other_prefixes_are_not_heard(
    redis_server: Any, prefix: str, publisher: RedisStore, tasks: Tasks
) -> None:
    a = await start(tasks, redis_server.url, prefix, "a")
    elsewhere = RedisStore(config(redis_server.url, prefix + "x:"), tasks, ManualClock())
    try:
        await eventually(lambda: a.backplane.connected)
        await elsewhere.publish(CHANNEL, Event("clear", "*", "z").encode())
        marker = Event("del", "marker", "z")
        await publisher.publish(CHANNEL, marker.encode())
        await eventually(lambda: bool(a.events))
        assert a.events == [marker]
    finally:
        await elsewhere.close()


@pytest.mark.parametrize(
    "junk",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(payload(op="purge", arg="k", origin="z"), id="unknown-op"),
        pytest.param(payload(op=["del"], arg="k", origin="z"), id="op-list"),
        pytest.param(b"[" * 100_000, id="deeply-nested"),  # ended the subscription
    ],
)
async def test_malformed_message_is_skipped_and_the_subscription_lives_on(
    redis_server: Any, prefix: str, publisher: RedisStore, tasks: Tasks, junk: bytes
) -> None:
    a = await start(tasks, redis_server.url, prefix, "a")
    await eventually(lambda: a.backplane.connected)
    await publisher.publish(CHANNEL, junk)
    after = Event("del", "after", "z")
    await publisher.publish(CHANNEL, after.encode())
    await eventually(lambda: bool(a.events), seconds=1.0)
    assert a.events == [after]
    assert a.backplane.received == 1


async def test_reconnect_after_a_restart_resyncs(redis_proc: Any, tasks: Tasks) -> None:
    prefix = f"t{uuid4().hex[:8]}:"
    a = await start(tasks, redis_proc.url, prefix, "a")
    await eventually(lambda: a.backplane.connected)
    assert a.resyncs == 0

    redis_proc.restart()
    await eventually(lambda: a.backplane.reconnects == 1 and a.backplane.connected)
    assert a.resyncs == 1  # messages sent while it was away are lost: L1 is not trusted

    store = RedisStore(config(redis_proc.url, prefix), tasks, ManualClock())
    try:
        event = Event("set", "k", "b")
        await store.publish(CHANNEL, event.encode())
        await eventually(lambda: bool(a.events))
        assert a.events == [event]
    finally:
        await store.close()


async def test_no_stamp_or_failing_message_ends_the_listener(
    redis_proc: Any, tasks: Tasks, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Review finding 1: {"stamp": 10**400} raised OverflowError out of run(), and the task
    # ended for good on every instance. Whatever one message does, the next still arrives.
    prefix = f"t{uuid4().hex[:8]}:"
    a = await start(tasks, redis_proc.url, prefix, "a")
    await eventually(lambda: a.backplane.connected)
    decode = Event.decode

    def failing(data: bytes) -> Event | None:
        if data == b"boom":
            raise RuntimeError("a bug in decoding one message")
        return decode(data)

    monkeypatch.setattr(Event, "decode", staticmethod(failing))
    store = RedisStore(config(redis_proc.url, prefix), tasks, ManualClock())
    try:
        for stamp in HOSTILE_STAMPS.values():
            await store.publish(CHANNEL, payload(op="ban", arg="a=1", origin="z", stamp=stamp))
        await store.publish(CHANNEL, b"boom")
        after = Event("del", "after", "z")
        await store.publish(CHANNEL, after.encode())
        await eventually(lambda: bool(a.events))
        assert a.events == [after]
        assert a.backplane.failed == 1
        assert (a.backplane.reconnects, a.resyncs) == (0, 0)  # the same subscription
    finally:
        await store.close()


async def test_a_failure_outside_one_message_reconnects_and_resyncs(
    redis_proc: Any, tasks: Tasks
) -> None:
    prefix = f"t{uuid4().hex[:8]}:"
    a = await start(tasks, redis_proc.url, prefix, "a")
    await eventually(lambda: a.backplane.connected)
    failures = [RuntimeError("a bug in the resync")]

    def resync() -> None:
        a.resyncs += 1
        if failures:
            raise failures.pop()

    a.backplane.on_resync = resync
    redis_proc.restart()
    await eventually(lambda: a.resyncs == 2 and a.backplane.connected)  # failed, then again
    store = RedisStore(config(redis_proc.url, prefix), tasks, ManualClock())
    try:
        event = Event("del", "k", "b")
        await store.publish(CHANNEL, event.encode())
        await eventually(lambda: bool(a.events))
        assert a.events == [event]
    finally:
        await store.close()
