"""proxy/fleet.py: live instances from their announcements (clock injected, nothing sleeps)."""

from __future__ import annotations

import json

import pytest

from proxy.backplane import Event
from proxy.clock import ManualClock
from proxy.fleet import EXPIRE_AFTER, Fleet


def test_a_fleet_of_one_until_others_announce_themselves() -> None:
    fleet = Fleet("me", every=2.0, clock=ManualClock(100.0))
    assert fleet.live() == 1
    fleet.heard(Event("alive", "", "b"))
    fleet.heard(Event("alive", "", "c"))
    fleet.heard(Event("alive", "", "c"))  # once each
    fleet.heard(Event("alive", "", "me"))  # itself counted once, already
    assert fleet.live() == 3


def test_an_instance_that_stops_announcing_expires_after_a_few_intervals() -> None:
    clock = ManualClock(100.0)
    fleet = Fleet("me", every=2.0, clock=clock)
    fleet.heard(Event("alive", "", "b"))
    fleet.heard(Event("alive", "", "c"))
    clock.advance(2.0 * EXPIRE_AFTER - 0.5)
    fleet.heard(Event("alive", "", "c"))
    assert fleet.live() == 3
    clock.advance(0.5)
    assert fleet.live() == 2  # b said nothing for EXPIRE_AFTER intervals
    clock.advance(2.0 * EXPIRE_AFTER)
    assert fleet.live() == 1


def test_while_deaf_the_count_is_the_last_known_and_expiry_resumes_after() -> None:
    clock = ManualClock(100.0)
    fleet = Fleet("me", every=2.0, clock=clock)
    fleet.heard(Event("alive", "", "b"))
    fleet.heard(Event("alive", "", "c"))
    clock.advance(1.0)
    fleet.connected(False)  # Redis gone: nobody can be heard, and nobody expires
    clock.advance(3600.0)
    assert fleet.live() == 3
    fleet.connected(True)  # back: they have as long to announce as they had left
    clock.advance(2.0 * EXPIRE_AFTER - 1.5)
    assert fleet.live() == 3
    fleet.heard(Event("alive", "", "b"))
    clock.advance(1.0)
    assert fleet.live() == 2


def test_other_events_are_not_announcements() -> None:
    fleet = Fleet("me", clock=ManualClock(0.0))
    fleet.heard(Event("del", "k", "b"))
    assert fleet.live() == 1


def test_the_map_is_bounded() -> None:
    fleet = Fleet("me", clock=ManualClock(0.0), limit=4)
    for i in range(1000):
        fleet.heard(Event("alive", "", f"i{i}"))
    assert fleet.live() == 5  # a flood can only make shares smaller, and costs no memory


@pytest.mark.parametrize(
    "body",
    [
        {"op": "alive", "arg": "x", "origin": "b"},  # announcements carry nothing
        {"op": "alive", "arg": "", "origin": ""},  # nobody
        {"op": "alive", "arg": "", "origin": "b" * 65},  # not an instance id
        {"op": "alive", "arg": "", "origin": ["b"]},
        {"op": "alive", "arg": "", "origin": "b", "stamp": "nan"},
        {"op": "Alive", "arg": "", "origin": "b"},
    ],
)
def test_malformed_announcements_are_ignored(body: dict[str, object]) -> None:
    assert Event.decode(json.dumps(body).encode()) is None


def test_an_announcement_round_trips() -> None:
    event = Fleet("abc123").alive()
    assert Event.decode(event.encode()) == event == Event("alive", "", "abc123")


async def test_announce_publishes_every_interval() -> None:
    sent: list[Event] = []

    async def publish(event: Event) -> None:
        sent.append(event)
        if len(sent) == 3:
            raise RuntimeError("enough")

    with pytest.raises(RuntimeError):
        await Fleet("me", every=0.0).announce(publish)
    assert sent == [Event("alive", "", "me")] * 3
