"""proxy/policy.py: storability, request classification and freshness (pure tables)."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy.policy import (
    Bypass,
    DontStore,
    Expired,
    Fresh,
    Lookup,
    Stale,
    Store,
    TTLClass,
    api_error,
    classify_request,
    current_age,
    freshness,
    parse_age,
    parse_cache_control,
    storability,
)

CLASS = TTLClass("c", ttl=300.0, negative_ttl=60.0)
NO_NEGATIVE = TTLClass("n", ttl=300.0, negative_ttl=0.0)
MAX = 1000


@pytest.mark.parametrize(
    ("status", "headers", "set_cookie", "size", "cls", "verdict"),
    [
        (200, {}, False, 10, CLASS, Store(300.0)),
        (200, {"Content-Type": "application/json"}, False, 0, CLASS, Store(300.0)),
        (203, {}, False, 10, CLASS, Store(300.0)),
        (204, {}, False, 0, CLASS, Store(300.0)),
        (301, {}, False, 10, CLASS, Store(300.0)),
        (308, {}, False, 10, CLASS, Store(300.0)),
        (404, {}, False, 10, CLASS, Store(60.0)),
        (410, {}, False, 10, CLASS, Store(60.0)),
        (404, {}, False, 10, NO_NEGATIVE, DontStore("ttl-zero")),
        (410, {}, False, 10, NO_NEGATIVE, DontStore("ttl-zero")),
        (200, {}, False, 10, NO_NEGATIVE, Store(300.0)),
        (200, {}, False, 10, TTLClass("z", 0.0, 0.0), DontStore("ttl-zero")),
        (500, {}, False, 10, CLASS, DontStore("status-5xx")),
        (502, {}, False, 10, CLASS, DontStore("status-5xx")),
        (503, {}, False, 10, CLASS, DontStore("status-5xx")),
        (504, {}, False, 10, CLASS, DontStore("status-5xx")),
        (501, {}, False, 10, CLASS, DontStore("status-5xx")),
        (429, {"Retry-After": "30"}, False, 10, CLASS, DontStore("status-429")),
        (403, {}, False, 10, CLASS, DontStore("status-403")),
        (401, {}, False, 10, CLASS, DontStore("status-401")),
        (400, {}, False, 10, CLASS, DontStore("status-400")),
        (302, {}, False, 10, CLASS, DontStore("status-302")),
        (206, {}, False, 10, CLASS, DontStore("status-206")),
        (304, {}, False, 0, CLASS, DontStore("status-304")),
        (200, {}, True, 10, CLASS, DontStore("set-cookie")),
        (404, {}, True, 10, CLASS, DontStore("set-cookie")),
        (200, {"Cache-Control": "no-store"}, False, 10, CLASS, DontStore("no-store")),
        (200, {"Cache-Control": "public, max-age=60, no-store"}, False, 10, CLASS,
         DontStore("no-store")),
        (200, {"Cache-Control": "NO-STORE"}, False, 10, CLASS, DontStore("no-store")),
        (200, {"Cache-Control": "private"}, False, 10, CLASS, DontStore("private")),
        (200, {"Cache-Control": "private, max-age=60"}, False, 10, CLASS, DontStore("private")),
        (200, {"Cache-Control": 'private="Set-Cookie"'}, False, 10, CLASS, DontStore("private")),
        (200, {"Cache-Control": "public, max-age=60"}, False, 10, CLASS, Store(300.0)),
        (200, {"Cache-Control": "no-cache"}, False, 10, CLASS, DontStore("no-cache")),
        (200, {"Cache-Control": 'no-cache="Set-Cookie"'}, False, 10, CLASS, DontStore("no-cache")),
        (200, {"Vary": "Accept, *"}, False, 10, CLASS, DontStore("vary-star")),
        (200, {"Vary": "*"}, False, 10, CLASS, DontStore("vary-star")),
        (200, {"Vary": " * "}, False, 10, CLASS, DontStore("vary-star")),
        (200, {"Vary": "Accept-Encoding"}, False, 10, CLASS, Store(300.0)),
        (200, {}, False, MAX, CLASS, Store(300.0)),
        (200, {}, False, MAX + 1, CLASS, DontStore("too-large")),
        (404, {}, False, MAX + 1, CLASS, DontStore("too-large")),
        # the first reason that applies is the one reported
        (503, {"Cache-Control": "no-store"}, True, MAX + 1, CLASS, DontStore("status-5xx")),
        (200, {"Cache-Control": "no-store, private", "Vary": "*"}, True, 10, CLASS,
         DontStore("set-cookie")),
        (200, {"Cache-Control": "private, no-store"}, False, 10, CLASS, DontStore("no-store")),
    ],
)  # fmt: skip
def test_storability(
    status: int,
    headers: dict[str, str],
    set_cookie: bool,
    size: int,
    cls: TTLClass,
    verdict: Store | DontStore,
) -> None:
    assert storability(status, headers, set_cookie, size, cls, MAX) == verdict


def test_storability_reads_headers_case_insensitively_from_a_ci_mapping() -> None:
    headers = CIMultiDict({"cache-control": "no-store"})
    assert storability(200, headers, False, 1, CLASS, MAX) == DontStore("no-store")
    headers = CIMultiDict({"vary": "*"})
    assert storability(200, headers, False, 1, CLASS, MAX) == DontStore("vary-star")


@pytest.mark.parametrize(
    ("method", "cls", "credentials", "shared", "verdict"),
    [
        ("GET", CLASS, False, False, Lookup()),
        ("HEAD", CLASS, False, False, Lookup()),
        ("GET", None, False, False, Bypass("route-pass")),
        ("POST", None, False, False, Bypass("route-pass")),
        ("POST", CLASS, False, False, Bypass("method")),
        ("PUT", CLASS, False, False, Bypass("method")),
        ("DELETE", CLASS, False, True, Bypass("method")),
        ("GET", CLASS, True, False, Bypass("credentials")),
        ("HEAD", CLASS, True, False, Bypass("credentials")),
        ("GET", CLASS, True, True, Lookup()),
        ("GET", CLASS, False, True, Lookup()),
        ("POST", CLASS, True, False, Bypass("method")),
    ],
)
def test_classify_request(
    method: str, cls: TTLClass | None, credentials: bool, shared: bool, verdict: object
) -> None:
    assert classify_request(method, cls, credentials, shared) == verdict


@pytest.mark.parametrize(
    ("ttl", "grace", "keep", "ahead", "now", "verdict"),
    [
        # stored at 1000; plain ttl
        (60.0, 0.0, 0.0, 0.0, 1000.0, Fresh(60.0)),
        (60.0, 0.0, 0.0, 0.0, 1059.5, Fresh(0.5)),
        (60.0, 0.0, 0.0, 0.0, 1060.0, Expired()),  # the boundary is expired
        (60.0, 0.0, 0.0, 0.0, 5000.0, Expired()),
        (0.0, 0.0, 0.0, 0.0, 1000.0, Expired()),
        (60.0, 0.0, 0.0, 0.0, 990.0, Fresh(70.0)),  # clock behind the store time
        # refresh-ahead at 80% of ttl
        (60.0, 0.0, 0.0, 0.8, 1047.9, Fresh(12.1, refresh=False)),
        (60.0, 0.0, 0.0, 0.8, 1048.0, Fresh(12.0, refresh=True)),
        # stale-while-revalidate 30 s: stale from 1060 until 1090
        (60.0, 30.0, 0.0, 0.0, 1060.0, Stale(0.0)),
        (60.0, 30.0, 0.0, 0.0, 1089.0, Stale(29.0)),
        (60.0, 30.0, 0.0, 0.0, 1090.0, Expired(usable_on_error=False)),
        # stale-if-error 120 s: usable on error until 1180, never served stale otherwise
        (60.0, 0.0, 120.0, 0.0, 1061.0, Expired(usable_on_error=True)),
        (60.0, 0.0, 120.0, 0.0, 1179.9, Expired(usable_on_error=True)),
        (60.0, 0.0, 120.0, 0.0, 1180.0, Expired(usable_on_error=False)),
        # both: grace first, then only on error
        (60.0, 30.0, 120.0, 0.0, 1070.0, Stale(10.0)),
        (60.0, 30.0, 120.0, 0.0, 1100.0, Expired(usable_on_error=True)),
    ],
)
def test_freshness(
    ttl: float, grace: float, keep: float, ahead: float, now: float, verdict: object
) -> None:
    result = freshness(1000.0, ttl, grace, keep, ahead, now)
    assert type(result) is type(verdict)
    if isinstance(verdict, Fresh):
        assert isinstance(result, Fresh)
        assert result.ttl_left == pytest.approx(verdict.ttl_left)
        assert result.refresh == verdict.refresh
    elif isinstance(verdict, Stale):
        assert isinstance(result, Stale)
        assert result.stale_for == pytest.approx(verdict.stale_for)
    else:
        assert result == verdict


@pytest.mark.parametrize(
    ("initial_age", "stored_at", "now", "age"),
    [
        (0.0, 1000.0, 1000.0, 0),
        (0.0, 1000.0, 1042.9, 42),  # whole seconds, rounded down
        (0.0, 1000.0, 1043.0, 43),
        (100.0, 1000.0, 1000.0, 100),
        (100.0, 1000.0, 1005.5, 105),
        (-50.0, 1000.0, 1010.0, 10),  # a negative reported age counts as 0
        (20.0, 1000.0, 990.0, 20),  # clock behind the store time: no negative residence
    ],
)
def test_current_age(initial_age: float, stored_at: float, now: float, age: int) -> None:
    assert current_age(initial_age, stored_at, now) == age


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("100", 100.0),
        ("0", 0.0),
        (" 7 ", 7.0),
        (None, 0.0),
        ("", 0.0),
        ("   ", 0.0),
        ("-5", 0.0),
        ("abc", 0.0),
        ("1.5", 0.0),
        ("1e3", 0.0),
        ("+5", 0.0),
        ("5s", 0.0),
        ("0x10", 0.0),
        ("1 2", 0.0),
        ("²", 0.0),  # str.isdigit() accepts it; RFC 9111 1.2.2 delta-seconds are ASCII digits
        ("١٢", 0.0),  # Arabic-Indic digits are not DIGIT either
        # RFC 9111 1.2.2: a delta-seconds too large to represent is taken as 2^31
        ("9" * 400, 2147483648.0),
    ],
)
def test_parse_age(value: str | None, seconds: float) -> None:
    assert parse_age(value) == seconds


def test_huge_upstream_age_still_yields_an_age() -> None:
    assert current_age(parse_age("9" * 400), 1000.0, 1001.0) >= 2**31


@pytest.mark.parametrize(
    ("value", "directives"),
    [
        ("", {}),
        ("public, max-age=10", {"public": None, "max-age": "10"}),
        ("NO-STORE", {"no-store": None}),
        ("No-Cache, Private", {"no-cache": None, "private": None}),
        ('private="Set-Cookie"', {"private": "Set-Cookie"}),
        ("max-age = 5", {"max-age": "5"}),
        (" , ,max-age=5,, ", {"max-age": "5"}),
        ("s-maxage=30,max-age=10", {"s-maxage": "30", "max-age": "10"}),
        ("max-age=1, max-age=2", {"max-age": "1"}),  # the first counts (RFC 9111 4.2.1)
        ("stale-while-revalidate=60", {"stale-while-revalidate": "60"}),
        ("max-age=", {"max-age": ""}),
    ],
)
def test_parse_cache_control(value: str, directives: dict[str, str | None]) -> None:
    assert parse_cache_control(value) == directives


def test_a_deeply_nested_upstream_body_is_not_an_api_error_and_not_a_crash() -> None:
    # json.loads raised RecursionError, which nothing caught (issue 11, finding 13).
    body = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert api_error(body, frozenset({"Note"}), ()) is None
    assert api_error(b'{"Note": "slow down"}', frozenset({"Note"}), ()) == "body has key 'Note'"


@pytest.mark.parametrize(
    ("vary", "unkeyed", "verdict"),
    [
        # issue 11 #2: an answer varying on a header that went upstream unkeyed
        ("Cookie", {"cookie"}, DontStore("vary")),
        ("accept-encoding, COOKIE", {"cookie"}, DontStore("vary")),
        ("Authorization", {"authorization", "cookie"}, DontStore("vary")),
        ("*", {"cookie"}, DontStore("vary")),  # names every header, so the cookie too
        # a header that never went upstream cannot have shaped the answer
        ("Cookie", set(), Store(300.0)),
        ("Cookie", {"authorization"}, Store(300.0)),
        ("Accept-Language", {"cookie"}, Store(300.0)),
        ("", {"cookie"}, Store(300.0)),
        ("*", set(), DontStore("vary-star")),
        ("X-Cookie, Cookies", {"cookie"}, Store(300.0)),  # whole names only
    ],
)
def test_storability_of_an_answer_varying_on_unkeyed_headers(
    vary: str, unkeyed: set[str], verdict: Store | DontStore
) -> None:
    headers = {"Vary": vary} if vary else {}
    assert storability(200, headers, False, 10, CLASS, MAX, unkeyed=frozenset(unkeyed)) == verdict
