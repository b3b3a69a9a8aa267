"""proxy/quotastate.py: quota counts kept across restarts in a local file (clocks injected:
nothing sleeps for time to pass), and real `serve` processes restarted on the memory and
layered backends."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import signal
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from conftest import (
    CountingUpstream,
    ProxyFactory,
    RedisServer,
    ServeProcess,
    base_config,
    layered_cache,
    spawn_serve,
    wait_listening,
)

from proxy.clock import ManualClock
from proxy.quota import Admitted, LocalQuota, QuotaReset, Refused, Window
from proxy.quotastate import FILE_NAME, MAX_BYTES, QuotaStateFile, encode, restore, state_directory


def _at(text: str, zone: str = "UTC") -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp()


NOON = _at("2024-03-05 12:00")


def _quota(clock: ManualClock, *windows: str, reset: str = "00:00 UTC") -> LocalQuota:
    parsed = tuple(Window.parse(w) for w in windows)
    return LocalQuota(parsed, QuotaReset.parse(reset), clock, clock)


def _spend(quota: LocalQuota, calls: int) -> None:
    for _ in range(calls):
        assert isinstance(quota.reserve(0), Admitted)


def test_state_directory_default_follows_xdg_and_config_wins() -> None:
    assert state_directory("", {"XDG_STATE_HOME": "/x"}) == Path("/x/cacheproxy")
    assert state_directory("", {}) == Path("~/.local/state/cacheproxy").expanduser()
    assert state_directory("/var/lib/cacheproxy", {"XDG_STATE_HOME": "/x"}) == Path(
        "/var/lib/cacheproxy"
    )


def test_round_trip_keeps_the_day_count_and_sliding_calls() -> None:
    clock = ManualClock(NOON)
    before = _quota(clock, "3/min", "20/day")
    _spend(before, 3)
    clock.advance(61)
    _spend(before, 2)
    data = encode({"api": before})
    assert len(data) < 400
    clock.advance(10)  # the restart
    after = _quota(clock, "3/min", "20/day")
    assert restore(data, {"api": after}, clock()) == []
    assert after.used() == (2, 5)
    _spend(after, 1)
    assert isinstance(after.reserve(0), Refused)  # the minute's third call was the last
    clock.advance(60)  # the two restored calls left the minute
    _spend(after, 3)
    assert after.used() == (3, 9)


def test_a_count_from_an_earlier_day_is_dropped() -> None:
    clock = ManualClock(_at("2024-03-05 23:59"))
    before = _quota(clock, "20/day")
    _spend(before, 20)
    data = encode({"api": before})
    clock.now = _at("2024-03-06 00:00")  # past the reset
    after = _quota(clock, "20/day")
    assert restore(data, {"api": after}, clock()) == []
    assert after.used() == (0,)


@pytest.mark.parametrize(
    ("old", "new", "used"),
    [
        # Counts are calls made: the new limit applies to them.
        (("25/day",), ("250/day",), (20,)),
        (("25/day",), ("10/day",), (10,)),  # more made than the new limit: spent
        (("25/day",), ("5/s", "25/day"), (0, 20)),  # a new window starts empty
        (("5/min", "25/day"), ("25/day",), (20,)),  # a window removed: ignored
        (("5/min",), ("2/min",), (2,)),  # sliding calls by unit: the last of them
    ],
)
def test_a_state_saved_under_other_limits_counts_the_calls_it_made(
    old: tuple[str, ...], new: tuple[str, ...], used: tuple[int, ...]
) -> None:
    clock = ManualClock(NOON)
    before = _quota(clock, *old)
    for _ in range(20):
        before.charge(0)
    after = _quota(clock, *new)
    assert restore(encode({"api": before}), {"api": after}, clock()) == []
    assert after.used() == used


def test_a_changed_quota_reset_keeps_a_day_that_overlaps_today() -> None:
    clock = ManualClock(_at("2024-03-05 12:00"))  # 07:00 in New York
    before = _quota(clock, "25/day")  # the UTC day began at 00:00 UTC
    _spend(before, 20)
    after = _quota(clock, "25/day", reset="00:00 America/New_York")
    restore(encode({"api": before}), {"api": after}, clock())
    assert after.used() == (20,)  # some of those calls may lie in New York's today: kept


def _spent(quota: LocalQuota) -> bool:
    return quota.used() == tuple(w.calls for w in quota.windows)


_GOOD_DAY = [NOON - 3600, NOON + 3600, 3]
BAD_FILES: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("not json", b"{not json"),
    ("not utf-8", b"\xff\xfe{}"),
    ("NaN", b'{"version": 1, "upstreams": {"api": {"day": [NaN, 1, 1]}}}'),
    ("a list", b"[]"),
    ("another version", b'{"version": 2, "upstreams": {}}'),
    ("no upstreams", b'{"version": 1}'),
    ("nested too deep", b"[" * 100_000 + b"]" * 100_000),
    ("oversized", b'{"version": 1, "upstreams": {}, "pad": "' + b"x" * MAX_BYTES + b'"}'),
]
BAD_ENTRIES: list[tuple[str, object]] = [
    ("entry not a mapping", [1, 2]),
    ("day not a list", {"day": 3}),
    ("day too short", {"day": [NOON, NOON + 60]}),
    ("NaN", {"day": [NOON, "NaN", 3]}),
    ("string start", {"day": ["x", NOON, 3]}),
    ("negative count", {"day": [NOON - 3600, NOON + 3600, -1]}),
    ("bool count", {"day": [NOON - 3600, NOON + 3600, True]}),
    ("float count", {"day": [NOON - 3600, NOON + 3600, 2.5]}),
    ("huge count", {"day": [NOON - 3600, NOON + 3600, 10**30]}),
    ("a week long day", {"day": [NOON - 3600, NOON + 7 * 86400, 3]}),
    ("from another century", {"day": [NOON - 3e9, NOON - 3e9 + 86400, 3]}),
    ("sliding not a mapping", {"day": _GOOD_DAY, "sliding": [1]}),
    ("sliding times not a list", {"sliding": {"1min": "x"}}),
    ("too many times", {"sliding": {"1min": [NOON] * 1001}}),
    ("a time in the future", {"sliding": {"1min": [NOON + 3600]}}),
    ("infinite time", {"sliding": {"1min": [1e999]}}),
    # An int too large for a float raised OverflowError, which stopped the start.
    ("a 400-digit start", {"day": [10**400, NOON, 3]}),
    ("a 400-digit time", {"sliding": {"1min": [10**400]}}),
]


@pytest.mark.parametrize(("case", "data"), BAD_FILES, ids=[c for c, _ in BAD_FILES])
async def test_a_corrupt_file_leaves_every_window_spent_until_its_reset(
    case: str, data: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock(NOON)
    quotas = {"api": _quota(clock, "5/min", "20/day"), "other": _quota(clock, "1/s")}
    (tmp_path / FILE_NAME).write_bytes(data)
    with caplog.at_level(logging.ERROR, "proxy.quotastate"):
        await QuotaStateFile(tmp_path, lambda: quotas, clock).load()
    assert "counts as spent until its reset" in caplog.text
    assert all(_spent(q) for q in quotas.values())
    assert isinstance(quotas["api"].reserve(0), Refused)
    clock.advance(60)  # the minute's reset: the day is still spent
    assert quotas["api"].used() == (0, 20) and isinstance(quotas["api"].reserve(0), Refused)
    clock.now = _at("2024-03-06 00:00")
    assert isinstance(quotas["api"].reserve(0), Admitted)
    assert json.loads((tmp_path / FILE_NAME).read_bytes())["version"] == 1  # rewritten


@pytest.mark.parametrize(("case", "entry"), BAD_ENTRIES, ids=[c for c, _ in BAD_ENTRIES])
async def test_a_malformed_entry_leaves_that_upstreams_windows_spent(
    case: str, entry: object, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock(NOON)
    quotas = {"api": _quota(clock, "5/min", "20/day"), "other": _quota(clock, "20/day")}
    state = {"version": 1, "upstreams": {"api": entry, "other": {"day": _GOOD_DAY}}}
    # 1e999: a number JSON allows, too large for a float (inf)
    (tmp_path / FILE_NAME).write_text(json.dumps(state).replace("Infinity", "1e999"))
    with caplog.at_level(logging.ERROR, "proxy.quotastate"):
        await QuotaStateFile(tmp_path, lambda: quotas, clock).load()
    assert "api: " in caplog.text and "counted as spent until their reset" in caplog.text
    assert _spent(quotas["api"])
    assert quotas["other"].used() == (3,)  # another upstream's good entry still applies


async def test_a_missing_file_is_a_fresh_budget(tmp_path: Path) -> None:
    clock = ManualClock(NOON)
    quotas = {"api": _quota(clock, "5/min", "20/day")}
    state = QuotaStateFile(tmp_path / "new" / "dir", lambda: quotas, clock)
    await state.load()
    assert quotas["api"].used() == (0, 0)
    assert (tmp_path / "new" / "dir" / FILE_NAME).exists()  # created, proving it writable


async def test_an_unreadable_file_leaves_every_window_spent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock(NOON)
    quotas = {"api": _quota(clock, "20/day")}
    (tmp_path / FILE_NAME).mkdir()  # reading it fails (as root, chmod would not)
    with caplog.at_level(logging.ERROR, "proxy.quotastate"):
        await QuotaStateFile(tmp_path, lambda: quotas, clock).load()
    assert f"cannot read {tmp_path / FILE_NAME}" in caplog.text
    assert _spent(quotas["api"])


async def test_a_state_dir_that_cannot_be_created_leaves_windows_spent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock(NOON)
    quotas = {"api": _quota(clock, "20/day")}
    (tmp_path / "file").write_text("")
    with caplog.at_level(logging.ERROR, "proxy.quotastate"):
        state = QuotaStateFile(tmp_path / "file" / "state", lambda: quotas, clock)
        await state.load()
    assert "cannot write" in caplog.text and "counts will not survive a restart" in caplog.text
    assert _spent(quotas["api"]) and state.failing
    caplog.clear()
    assert not await state.save(force=True)
    assert caplog.text == ""  # logged once while it keeps failing


async def test_saves_only_when_a_count_changed_and_atomically(tmp_path: Path) -> None:
    clock = ManualClock(NOON)
    quotas = {"api": _quota(clock, "20/day")}
    state = QuotaStateFile(tmp_path, lambda: quotas, clock)
    await state.load()
    path = tmp_path / FILE_NAME
    path.unlink()
    assert await state.save() and not path.exists()  # nothing changed: nothing written
    _spend(quotas["api"], 2)
    assert await state.save()
    assert json.loads(path.read_text())["upstreams"]["api"]["day"][2] == 2
    assert os.listdir(tmp_path) == [FILE_NAME]  # no temp file left behind


async def test_the_background_task_writes_at_most_once_per_period(tmp_path: Path) -> None:
    clock = ManualClock(NOON)
    quotas = {"api": _quota(clock, "100/day")}
    state = QuotaStateFile(tmp_path, lambda: quotas, clock)
    await state.load()
    writes = 0
    save = state.save

    async def counted(force: bool = False) -> bool:
        nonlocal writes
        changed = quotas["api"].changes != (state._saved or {}).get("api")
        writes += changed
        return await save(force)

    state.save = counted  # type: ignore[method-assign]
    state.start(every=0.05)
    try:
        for _ in range(10):  # ten calls in a burst: one write
            quotas["api"].charge(0)
        path = tmp_path / FILE_NAME
        for _ in range(200):
            if json.loads(path.read_text())["upstreams"]["api"]["day"][2] == 10:
                break
            await asyncio.sleep(0.01)  # waiting for the task, not for time to pass
        assert writes == 1
    finally:
        await state.close()


# --- real `serve` processes, restarted ----------------------------------------------------


async def _get(port: int, key: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/v8/finance/chart/{key}") as response,
    ):
        return response.status


async def _run_and_stop(data: dict[str, Any], directory: Path, keys: list[str]) -> list[int]:
    """Start `serve`, send one request per key, then SIGTERM it and wait for it to exit."""
    os.makedirs(directory, exist_ok=True)
    proc: ServeProcess = await spawn_serve(copy.deepcopy(data), directory)  # new ports
    try:
        await wait_listening(proc.port)
        statuses = [await _get(proc.port, key) for key in keys]
    finally:
        proc.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.process.wait(), 20)
    assert proc.process.returncode == 0, proc.log.read_text()
    return statuses


async def test_a_restarted_memory_backend_keeps_the_days_count(
    upstream: CountingUpstream, tmp_path: Path
) -> None:
    data = base_config(upstream.url, server={"state_dir": str(tmp_path / "state")})
    data["upstreams"]["api"].update(rate_limit="5/day", rate_limit_wait=0)
    first = await _run_and_stop(data, tmp_path / "one", [f"A{i}" for i in range(3)])
    assert first == [200] * 3 and upstream.total == 3
    saved = json.loads((tmp_path / "state" / FILE_NAME).read_text())
    assert saved["upstreams"]["api"]["day"][2] == 3
    second = await _run_and_stop(data, tmp_path / "two", [f"B{i}" for i in range(5)])
    assert second == [200, 200, 503, 503, 503]
    assert upstream.total == 5  # the day's limit across both runs


async def test_a_restarted_layered_instance_keeps_the_days_count_in_redis(
    upstream: CountingUpstream, tmp_path: Path, redis_server: RedisServer, state_home: Path
) -> None:
    data = base_config(upstream.url, cache=layered_cache(redis_server.url))
    data["upstreams"]["api"].update(rate_limit="5/day", rate_limit_wait=0)
    first = await _run_and_stop(data, tmp_path / "one", [f"A{i}" for i in range(3)])
    assert first == [200] * 3 and upstream.total == 3
    second = await _run_and_stop(data, tmp_path / "two", [f"B{i}" for i in range(5)])
    assert second == [200, 200, 503, 503, 503]
    assert upstream.total == 5
    assert not (state_home / "cacheproxy" / FILE_NAME).exists()  # Redis keeps it, no file


async def test_a_proxy_whose_state_dir_is_unwritable_still_serves_stale_and_refuses_calls(
    make_proxy: ProxyFactory, upstream: CountingUpstream, tmp_path: Path
) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    proxy = await make_proxy(
        upstreams={"api": {"url": upstream.url, "rate_limit": "20/day", "rate_limit_wait": 0}},
        server={"state_dir": str(blocked / "state")},
    )
    response = await proxy.client.get("/v8/finance/chart/A")
    assert response.status == 503 and upstream.total == 0  # spent until the reset
    assert "Retry-After" in response.headers
