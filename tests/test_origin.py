"""proxy/origin.py and `ttl: origin`: RFC 9111 freshness, age, conditionals, 304s, invalidation."""

from __future__ import annotations

from email.utils import formatdate

import pytest
from conftest import CountingUpstream, ProxyFactory, RedisServer, Reply, layered_cache

from proxy.origin import (
    corrected_initial_age,
    freshness_lifetime,
    http_date,
    not_modified,
    precondition,
    stale_windows,
    updated_headers,
)
from proxy.policy import DontStore, Store, TTLClass, parse_cache_control, storability

T = 1_700_000_000.0  # when the response arrived


def date(offset: float) -> str:
    return formatdate(T + offset, usegmt=True)


@pytest.mark.parametrize(
    ("status", "headers", "lifetime"),
    [
        (200, {"Cache-Control": "max-age=60"}, 60),
        (200, {"Cache-Control": "s-maxage=10, max-age=60"}, 10),  # shared caches: s-maxage
        (200, {"Cache-Control": 'max-age="60"'}, 60),  # quoted form accepted
        (200, {"Cache-Control": "max-age=60, max-age=5"}, 60),  # the first occurrence counts
        (200, {"Cache-Control": "max-age=abc"}, 0),  # invalid: stale
        (200, {"Cache-Control": "max-age=-5"}, 0),
        (200, {"Cache-Control": "max-age=1.5"}, 0),
        (200, {"Cache-Control": "max-age=99999999999999"}, 2**31),
        (200, {"Cache-Control": "max-age=30", "Expires": date(3600), "Date": date(0)}, 30),
        (200, {"Expires": date(3600), "Date": date(0)}, 3600),
        (200, {"Expires": date(3600), "Date": date(-600)}, 4200),  # relative to Date
        (200, {"Expires": date(3600)}, 3600),  # no Date: the time of receipt
        (200, {"Expires": "0", "Date": date(0)}, 0),  # invalid Expires: already expired
        (200, {"Expires": date(-60), "Date": date(0)}, 0),
        (200, {"Last-Modified": date(-1000), "Date": date(0)}, 100),  # 10% heuristic
        (200, {"Last-Modified": date(-10_000_000), "Date": date(0)}, 86400),  # capped at 1 day
        (404, {"Last-Modified": date(-1000), "Date": date(0)}, 100),  # cacheable by default
        (302, {"Last-Modified": date(-1000), "Date": date(0)}, 0),  # not by default ...
        (302, {"Cache-Control": "public", "Last-Modified": date(-1000), "Date": date(0)}, 100),
        (200, {"Last-Modified": date(1000), "Date": date(0)}, 0),  # modified in the future
        (200, {}, 0),
    ],
)
def test_freshness_lifetime(status: int, headers: dict[str, str], lifetime: float) -> None:
    assert freshness_lifetime(status, headers, T) == pytest.approx(lifetime)


@pytest.mark.parametrize(
    ("headers", "requested", "age"),
    [
        ({}, T, 0),
        ({"Age": "30"}, T, 30),
        ({"Age": "30"}, T - 2, 32),  # plus the response delay
        ({"Date": date(-50)}, T, 50),  # apparent age from Date
        ({"Date": date(-50), "Age": "30"}, T, 50),  # the larger of the two
        ({"Date": date(-10), "Age": "30"}, T - 1, 31),
        ({"Date": date(+100)}, T, 0),  # an upstream clock ahead of ours: no negative age
        ({"Age": "junk"}, T, 0),
    ],
)
def test_corrected_initial_age(headers: dict[str, str], requested: float, age: float) -> None:
    assert corrected_initial_age(headers, requested, T) == pytest.approx(age)


@pytest.mark.parametrize(
    ("cache_control", "windows"),
    [
        ("max-age=60", (5, 7)),  # the class's defaults
        ("max-age=60, stale-while-revalidate=30, stale-if-error=600", (30, 600)),
        ("max-age=60, stale-while-revalidate=30, must-revalidate", (0, 0)),
        ("max-age=60, proxy-revalidate, stale-if-error=600", (0, 0)),
        ("s-maxage=60, stale-if-error=600", (0, 0)),  # s-maxage implies proxy-revalidate
        ("max-age=60, stale-if-error=x", (5, 7)),
    ],
)
def test_stale_windows(cache_control: str, windows: tuple[float, float]) -> None:
    assert stale_windows(parse_cache_control(cache_control), 5, 7) == windows


ORIGIN = TTLClass("origin", 0.0, 0.0, origin=True)


@pytest.mark.parametrize(
    ("status", "headers", "verdict"),
    [
        (200, {"Cache-Control": "max-age=60"}, Store(60)),
        (200, {"Cache-Control": "max-age=60", "Age": "20"}, Store(40, initial_age=20)),
        (200, {"Cache-Control": "public, max-age=60, stale-if-error=300"}, Store(60, keep=300)),
        (200, {"Cache-Control": "max-age=0"}, DontStore("stale-on-arrival")),
        (200, {"Cache-Control": "max-age=10", "Age": "30"}, DontStore("stale-on-arrival")),
        (200, {"Cache-Control": "max-age=0, stale-if-error=60"}, Store(0, keep=60)),
        (200, {"Cache-Control": "no-store, max-age=60"}, DontStore("no-store")),
        (200, {"Cache-Control": "private, max-age=60"}, DontStore("private")),
        (200, {"Cache-Control": "no-cache, max-age=60"}, DontStore("no-cache")),
        (404, {"Cache-Control": "max-age=30"}, Store(30)),
        (200, {"Cache-Control": "max-age=60", "Vary": "*"}, DontStore("vary-star")),
        (503, {"Cache-Control": "max-age=60"}, DontStore("status-5xx")),
        (200, {"Cache-Control": 'no-cache="Set-Cookie, X-A", max-age=60'}, DontStore("no-cache")),
    ],
)
def test_origin_storability(status: int, headers: dict[str, str], verdict: object) -> None:
    assert storability(status, headers, False, 10, ORIGIN, 1000, T, T) == verdict


@pytest.mark.parametrize(
    ("cache_control", "stored"),
    [
        ("max-age=60", False),  # RFC 9111 3.5: not for an authorized request ...
        ("public, max-age=60", True),  # ... unless the response says so
        ("s-maxage=60", True),
        ("max-age=60, must-revalidate", True),
    ],
)
def test_origin_responses_to_authorized_requests(cache_control: str, stored: bool) -> None:
    verdict = storability(
        200, {"Cache-Control": cache_control}, False, 10, ORIGIN, 1000, T, T, authorized=True
    )
    assert isinstance(verdict, Store) is stored


def test_quoted_directive_values_may_hold_commas() -> None:
    assert parse_cache_control('no-cache="Set-Cookie, X-A", max-age=5') == {
        "no-cache": "Set-Cookie, X-A",
        "max-age": "5",
    }


@pytest.mark.parametrize(
    ("headers", "etag", "modified", "status"),
    [
        ({}, '"a"', date(-10), 200),
        ({"If-Match": '"a"'}, '"a"', None, 200),
        ({"If-Match": '"b"'}, '"a"', None, 412),
        ({"If-Match": 'W/"a"'}, '"a"', None, 412),  # strong comparison
        ({"If-Match": '"a"'}, 'W/"a"', None, 412),
        ({"If-Match": "*"}, '"a"', None, 200),
        ({"If-Unmodified-Since": date(0)}, None, date(-10), 200),
        ({"If-Unmodified-Since": date(-20)}, None, date(-10), 412),
        ({"If-Match": '"a"', "If-Unmodified-Since": date(-20)}, '"a"', date(-10), 200),
        ({"If-Match": '"a"', "If-None-Match": '"a"'}, '"a"', None, 304),
        ({"If-Modified-Since": date(0)}, None, date(-10), 304),  # modified = a stored Date
    ],
)
def test_preconditions(
    headers: dict[str, str], etag: str | None, modified: str | None, status: int
) -> None:
    assert precondition(headers, etag, modified) == status


@pytest.mark.parametrize(
    ("inm", "ims", "etag", "modified", "result"),
    [
        ('"a"', None, '"a"', None, True),
        ('"b"', None, '"a"', None, False),
        ('"x", "a"', None, '"a"', None, True),
        ('W/"a"', None, '"a"', None, True),  # weak comparison
        ('"a"', None, 'W/"a"', None, True),
        ("*", None, None, None, True),
        ('"a"', None, None, None, False),
        (None, date(0), None, date(-10), True),  # not modified since
        (None, date(-20), None, date(-10), False),
        (None, "yesterday", None, date(-10), False),  # invalid IMS is ignored
        (None, date(0), None, None, False),
        ('"b"', date(0), '"a"', date(-10), False),  # If-None-Match decides, IMS is ignored
        (None, None, '"a"', date(-10), False),
    ],
)
def test_not_modified(
    inm: str | None, ims: str | None, etag: str | None, modified: str | None, result: bool
) -> None:
    assert not_modified(inm, ims, etag, modified) is result


def test_a_304_updates_the_stored_headers() -> None:
    stored = (("Content-Type", "application/json"), ("ETag", '"1"'), ("Cache-Control", "max-age=5"),
              ("Content-Length", "10"), ("X-Keep", "yes"))  # fmt: skip
    fresh = (("ETag", '"1"'), ("Cache-Control", "max-age=60"), ("Content-Length", "0"))
    assert updated_headers(stored, fresh) == (
        ("Content-Type", "application/json"), ("Content-Length", "10"), ("X-Keep", "yes"),
        ("ETag", '"1"'), ("Cache-Control", "max-age=60"),
    )  # fmt: skip


# --- end to end -----------------------------------------------------------------------------


async def test_clients_with_the_current_validators_get_304(
    proxy: object, upstream: CountingUpstream
) -> None:
    from conftest import Proxy

    assert isinstance(proxy, Proxy)
    upstream.replies["/quote/AAPL"] = Reply(
        body=b'{"p": 1}', headers={"ETag": '"v1"', "Last-Modified": date(-3600)}
    )
    first = await proxy.client.get("/quote/AAPL", headers={"If-None-Match": '"v1"'})
    assert first.status == 304  # even on the miss that stored it
    hit = await proxy.client.get("/quote/AAPL", headers={"If-None-Match": 'W/"v1"'})
    assert hit.status == 304
    assert hit.headers["ETag"] == '"v1"'
    assert hit.headers["Cache-Status"].startswith("cacheproxy; hit")
    assert "Age" in hit.headers
    assert await hit.read() == b""
    since = await proxy.client.get("/quote/AAPL", headers={"If-Modified-Since": date(0)})
    assert since.status == 304
    changed = await proxy.client.get("/quote/AAPL", headers={"If-None-Match": '"v0"'})
    assert changed.status == 200
    assert await changed.read() == b'{"p": 1}'
    assert upstream.total == 1


async def test_expired_entries_are_revalidated_with_their_validators(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy()
    path = "/v8/finance/chart/AAPL"
    upstream.replies[path] = Reply(body=b'{"big": "chart"}', headers={"ETag": '"c1"'})
    await proxy.client.get(path)
    proxy.clock.advance(61)
    renewed = await proxy.client.get(path)
    assert renewed.status == 200
    assert await renewed.read() == b'{"big": "chart"}'
    assert renewed.headers["Cache-Status"] == "cacheproxy; fwd=stale; fwd-status=304; stored"
    assert upstream.seen[-1].headers["If-None-Match"] == '"c1"'
    assert upstream.not_modified == 1  # the body did not travel again
    hit = await proxy.client.get(path)
    assert hit.headers["Cache-Status"].startswith("cacheproxy; hit; ttl=60")
    assert upstream.total == 2


async def test_ttl_origin_follows_the_upstream(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy(ttl_classes={"short": {"ttl": "origin"}, "long": "1h"})
    path = "/v8/finance/chart/MSFT"
    upstream.replies[path] = Reply(headers={"Cache-Control": "public, max-age=30", "Age": "10"})
    first = await proxy.client.get(path)
    assert first.headers["Cache-Status"] == "cacheproxy; fwd=miss; stored"
    assert first.headers["Age"] == "10"
    proxy.clock.advance(19)
    hit = await proxy.client.get(path)
    assert hit.headers["Cache-Status"] == "cacheproxy; hit; ttl=1; detail=l1"
    assert hit.headers["Age"] == "29"
    proxy.clock.advance(1)
    assert "fwd=miss" in (await proxy.client.get(path)).headers["Cache-Status"]
    upstream.replies["/v8/finance/chart/NOSTORE"] = Reply(headers={"Cache-Control": "no-store"})
    uncached = await proxy.client.get("/v8/finance/chart/NOSTORE")
    assert uncached.headers["Cache-Status"] == "cacheproxy; fwd=miss; detail=no-store"
    upstream.replies["/v8/finance/chart/NONE"] = Reply(headers={})
    silent = await proxy.client.get("/v8/finance/chart/NONE")
    assert silent.headers["Cache-Status"] == "cacheproxy; fwd=miss; detail=stale-on-arrival"


async def test_if_modified_since_against_an_entry_without_last_modified_uses_its_date(
    proxy: object, upstream: CountingUpstream
) -> None:
    from conftest import Proxy

    assert isinstance(proxy, Proxy)
    upstream.replies["/quote/D"] = Reply(body=b"{}", headers={"Date": date(-100)})
    await proxy.client.get("/quote/D")
    since = await proxy.client.get("/quote/D", headers={"If-Modified-Since": date(-50)})
    assert since.status == 304


async def test_an_inflated_gzip_entry_has_a_weak_etag(
    proxy: object, upstream: CountingUpstream
) -> None:
    import gzip

    from conftest import Proxy

    assert isinstance(proxy, Proxy)
    upstream.replies["/quote/Z"] = Reply(
        body=gzip.compress(b"{}"), headers={"Content-Encoding": "gzip", "ETag": '"z1"'}
    )
    await proxy.client.get("/quote/Z")
    zipped = await proxy.client.get("/quote/Z", headers={"Accept-Encoding": "gzip"})
    plain = await proxy.client.get("/quote/Z", headers={"Accept-Encoding": "identity"})
    assert zipped.headers["ETag"] == '"z1"'
    assert plain.headers["ETag"] == 'W/"z1"'


async def test_unsafe_requests_on_another_route_invalidate_every_variant(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy(
        routes=[
            {"name": "q", "path": "/q/{s}", "upstream": "api", "ttl_class": "long",
             "key_headers": ["Accept-Language"]},
            {"name": "q_put", "path": "/q/{s}", "methods": ["PUT"], "upstream": "api",
             "pass": True},
        ]
    )  # fmt: skip
    for language in ("en", "fr"):
        await proxy.client.get("/q/A", headers={"Accept-Language": language})
    assert len(proxy.l1) == 2
    proxy.clock.advance(1)  # variants are banned lazily by time: stored before the PUT
    await proxy.client.put("/q/A", data=b"new")
    calls = upstream.total
    for language in ("en", "fr"):
        again = await proxy.client.get("/q/A", headers={"Accept-Language": language})
        assert again.headers["Cache-Status"] == "cacheproxy; fwd=miss; stored"
    assert upstream.total == calls + 2


@pytest.mark.parametrize(("status", "invalidates"), [(200, True), (303, True), (500, False)])
async def test_unsafe_methods_invalidate_the_url(
    make_proxy: ProxyFactory, upstream: CountingUpstream, status: int, invalidates: bool
) -> None:
    proxy = await make_proxy()
    await proxy.client.get("/quote/AAPL")
    assert "GET api /quote/AAPL" in proxy.l1
    upstream.replies["/quote/AAPL"] = Reply(status=status, body=b"done")
    await proxy.client.post("/quote/AAPL", data=b"update", allow_redirects=False)
    assert ("GET api /quote/AAPL" not in proxy.l1) is invalidates


def test_a_date_with_an_enormous_year_is_invalid_not_an_error() -> None:
    # Found by tests/test_fuzz.py: parsedate_to_datetime raised OverflowError.
    date = "Mon, 01 Jan 99999999999999999999 00:00:00 GMT"
    assert http_date(date) is None
    headers = {"Date": date, "Last-Modified": date, "Expires": date}
    assert freshness_lifetime(200, headers, 1_700_000_000.0) == 0.0


@pytest.mark.parametrize(
    "headers",
    [{"Expires": "Fri, 31 Dec 9999 23:59:59 GMT"},  # the "never expires" idiom
     {"Cache-Control": "max-age=99999999999"},
     {"Date": "Mon, 01 Jan 1900 00:00:00 GMT", "Expires": "Fri, 31 Dec 9999 23:59:59 GMT"}],
    ids=["expires-9999", "max-age-huge", "dated-1900"],
)  # fmt: skip
async def test_far_lifetimes_are_stored_as_an_l2_reader_accepts_them(
    make_proxy: ProxyFactory, upstream: CountingUpstream, redis_server: RedisServer,
    headers: dict[str, str],
) -> None:  # fmt: skip
    # entry.decode refuses lifetimes past 2^31 s (review of issue 11); the writer caps them,
    # as RFC 9111 1.2.2 reads larger values, so such entries live in L2 and are shared.
    cache = layered_cache(redis_server.url)
    writer = await make_proxy(cache=cache, ttl_classes={"short": {"ttl": "origin"}, "long": "1h"})
    path = "/v8/finance/chart/FAR"
    upstream.replies[path] = Reply(headers={"Date": formatdate(writer.clock(), usegmt=True),
                                            **headers})  # fmt: skip
    first = await writer.client.get(path)
    assert first.headers["Cache-Status"] == "cacheproxy; fwd=miss; stored"
    await writer.deps.store.flush()
    reader = await make_proxy(cache=cache, ttl_classes={"short": {"ttl": "origin"}, "long": "1h"})
    [l2] = reader.deps.store.remotes
    found = await l2.get("GET api " + path)
    assert found is not None and l2.stats.corrupt == 0
    assert max(found.ttl, found.initial_age) <= 2**31
