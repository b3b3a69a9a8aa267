"""proxy/decisions.py: what a lookup and an upstream answer become (pure, table-driven)."""

from __future__ import annotations

import pytest

from proxy.decisions import (
    Decision,
    Failed,
    Judgement,
    Private,
    Revalidate,
    Serve,
    ServeStale,
    Stored,
    Uncached,
    decide,
    judge,
)
from proxy.policy import DontStore, Storability, Store

NOW = 1_000_000.0


@pytest.mark.parametrize(
    ("age", "ahead", "soft", "expected"),
    [
        (10, 0.0, False, Serve(50.0)),  # fresh
        (50, 0.8, False, Serve(10.0, refresh=True)),  # refresh-ahead is due
        (40, 0.8, False, Serve(20.0)),  # not yet
        (70, 0.0, False, ServeStale()),  # within grace (30 s)
        (100, 0.0, False, Revalidate(stand_in=True)),  # past grace, within keep (120 s)
        (200, 0.0, False, Revalidate(stand_in=False)),  # past every window
        (10, 0.0, True, Revalidate(stand_in=True)),  # soft-purged: never served as a hit
        (70, 0.0, True, Revalidate(stand_in=True)),
        (200, 0.0, True, Revalidate(stand_in=False)),
    ],
)
def test_decide(age: float, ahead: float, soft: bool, expected: Decision) -> None:
    assert decide(NOW - age, 60.0, 30.0, 120.0, ahead, soft, NOW) == expected


STORE: Storability = Store(60.0)


@pytest.mark.parametrize(
    ("status", "verdict", "api", "revalidated", "stand_in", "expected"),
    [
        (200, STORE, None, False, False, Stored()),
        (304, STORE, None, True, False, Stored()),  # a 304 renews what we hold
        (200, DontStore("no-cache"), None, False, False, Uncached("no-cache")),
        (200, DontStore("set-cookie"), None, False, False, Private("set-cookie")),
        (200, DontStore("private"), None, False, False, Private("private")),
        (200, DontStore("no-store"), None, False, False, Private("no-store")),
        (200, DontStore("vary"), None, False, False, Private("vary")),
        # A 304 renewing a held entry is never one client's alone: its body is ours.
        (304, DontStore("no-store"), None, True, False, Uncached("no-store")),
        # Failures: what we hold stands in, or the failure is served as answered.
        (503, DontStore("status-5xx"), None, False, True, Failed(503)),
        (429, DontStore("status-429"), None, False, True, Failed(429)),
        (503, DontStore("status-5xx"), None, False, False, Uncached("status-5xx")),
        # A 200 that is an API error: never stored; with a stand-in, a failure.
        (200, STORE, "body has key 'Note'", False, False, Uncached("api-error")),
        (200, STORE, "body has key 'Note'", False, True, Failed(200)),
        (404, DontStore("ttl-zero"), None, False, True, Uncached("ttl-zero")),
    ],
)
def test_judge(
    status: int, verdict: Storability, api: str | None, revalidated: bool, stand_in: bool,
    expected: Judgement,
) -> None:  # fmt: skip
    assert judge(status, verdict, api, revalidated, stand_in) == expected
