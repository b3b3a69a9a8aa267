"""proxy/store/solo.py: an instance alone grants itself every lease and keeps nothing aside."""

from __future__ import annotations

from proxy.store.solo import Solo


async def test_solo_grants_every_lease_and_keeps_nothing() -> None:
    solo = Solo()
    assert solo.reaches_others is False
    assert await solo.acquire_lease("k", "a", 10.0) is True
    assert await solo.acquire_lease("k", "b", 10.0) is True  # nobody else to exclude
    assert await solo.lease_held("k") is False
    await solo.release_lease("k", "a")
    await solo.save_bans({"tag=x": b"[1, 0]"}, ())
    assert await solo.load_bans() == {}  # bans live in the layered store's Bans only
    await solo.add_popularity({"k": 5})
    assert await solo.hottest(3) == []  # counts live in the layered store's Popular only
    await solo.publish("events", b"x")
