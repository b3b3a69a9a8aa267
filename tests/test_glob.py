"""proxy/glob.py: Redis-style globs, matched without backtracking (issue 11, finding 1)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector
from conftest import (
    CountingUpstream,
    ProxyFactory,
    RedisServer,
    ServeProcess,
    base_config,
    layered_cache,
    spawn_serve,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from proxy.backplane import CHANNEL, Event
from proxy.glob import MAX_EVENT_LENGTH, MAX_LENGTH, Glob, bounded
from proxy.keys import escape_glob

# --- what a glob means (tests/test_fuzz.py checks it against Redis's own matcher) -----------


@pytest.mark.parametrize(
    ("pattern", "text", "matches"),
    [
        ("*", "", True),
        ("*", "GET api /x?a=1 h=v", True),
        ("* * /v8/finance/chart/*", "GET api /v8/finance/chart/AAPL?range=5d", True),
        ("* * /v8/finance/chart/*", "GET api /quote/AAPL", False),
        ("a?c", "abc", True),
        ("a?c", "ac", False),
        ("a?c", "abbc", False),
        ("[abc]x", "bx", True),
        ("[abc]x", "dx", False),
        ("[^abc]x", "bx", False),
        ("[^abc]x", "dx", True),
        ("[!abc]x", "dx", True),
        ("[a-c]", "b", True),
        ("[a-c]", "d", False),
        ("a[b", "a[b", True),  # an unclosed bracket is literal
        ("a.b", "a.b", True),
        ("a.b", "axb", False),  # regex metacharacters are literal
        ("a+b", "a+b", True),
        ("a+b", "aab", False),
        ("(x)|y", "(x)|y", True),
        ("(x)|y", "y", False),
        ("a\\*b", "a*b", True),
        ("a\\*b", "axb", False),
        ("a\\?b", "a?b", True),
        ("a\\?b", "axb", False),
        ("abc", "abcd", False),  # anchored at both ends
        ("abc", "xabc", False),
        ("a*", "a\nb", True),
        # around stars (the matcher splits the glob there)
        ("", "", True),
        ("", "a", False),
        ("***", "", True),
        ("***", "any\nthing", True),
        ("*?", "", False),
        ("*?", "a", True),
        ("?*?", "a", False),
        ("?*?", "ab", True),
        ("*?*?*?", "ab", False),
        ("*?*?*?", "abc", True),
        ("a*?b", "ab", False),
        ("a*?b", "axb", True),
        ("a*?b", "axyzb", True),
        ("a*a", "a", False),  # the first and last pieces may not overlap
        ("a*a", "aa", True),
        ("*ab*ab", "ab", False),
        ("*ab*ab", "abab", True),
        ("*ab*ab", "aabxab", True),
        ("*aab*b", "aaab", False),
        ("*aab*b", "aaabb", True),
        ("*a*b*c*", "xaybzc", True),
        ("*a*b*c*", "xcybza", False),
        ("*[ab]?[ab]*", "xaxbx", True),
        ("*[ab]?[ab]*", "xaxxbx", False),
        # escapes
        ("\\*", "*", True),
        ("\\*", "x", False),
        ("*\\*", "ab*", True),
        ("*\\**", "a*b", True),
        ("*\\**", "ab", False),
        ("\\?*", "?x", True),
        ("\\?*", "x?", False),
        ("a\\", "a\\", True),  # a trailing backslash is literal
        ("[*]", "*", True),  # metacharacters in a class are literal
        ("[*]", "x", False),
        ("[?]*", "?ab", True),
        ("[?]*", "xab", False),
    ],
)
def test_matches(pattern: str, text: str, matches: bool) -> None:
    assert Glob.parse(pattern).matches(text) is matches


@pytest.mark.parametrize(
    ("pattern", "text", "matches"),
    [
        ("[z-a]", "b", True),  # Redis swaps a reversed range's ends; this was re.error
        ("[z-a]", "-", False),
        ("[^]", "x", True),  # an empty negated class: re.error before
        ("[!]", "x", True),
        ("[a--]", "-", True),
    ],
)
def test_odd_classes_never_make_an_invalid_regex(pattern: str, text: str, matches: bool) -> None:
    assert Glob.parse(pattern).matches(text) is matches


# --- pathological globs: what made the old backtracking regex run for hours -----------------

STARS = "*?" * 30 + "#"  # 5^30 ways to split a key for a backtracking regex


@pytest.mark.parametrize(
    ("pattern", "text", "matches"),
    [
        (STARS, "x" * 100, False),
        (STARS, "x" * 59 + "#", True),
        (STARS, "x" * 29 + "#", False),  # 30 characters must come before the #
        ("*?" * 30 + "*", "x" * 100, True),
        ("*a" * 30 + "*b", "a" * 200, False),
        ("*a" * 30 + "*b", "a" * 200 + "b", True),
        ("a*" * 40 + "#", "a" * 200, False),
        ("*[a-z]" * 40 + "#", "q" * 200, False),
        ("*aab" * 20 + "*c", "aab" * 100, False),
        ("*" + "a?" * 200 + "b*", "a" * 1000, False),
        ("*" + "a?" * 200 + "b*", "a" * 600 + "b" + "a" * 400, True),
        ("* * /" + "*?" * 500 + "#", "GET chart /v8/finance/chart/AAPL?range=5d", False),
    ],
)
def test_pathological_globs(pattern: str, text: str, matches: bool) -> None:
    assert Glob.parse(pattern).matches(text) is matches


def test_thirty_star_question_marks_over_ten_thousand_keys_take_well_under_a_second() -> None:
    # A generous bound: this takes milliseconds; the old regex took 22 s for 8 pairs over 20
    # keys, and each pair multiplied that by ~5.
    keys = [f"GET chart /v8/finance/chart/S{i}?range=5d&interval=1d" for i in range(10_000)]
    glob = Glob.parse("* * /" + STARS)
    started = time.perf_counter()
    assert not any(glob.matches(key) for key in keys)
    assert time.perf_counter() - started < 1.0


# --- bounds ------------------------------------------------------------------------------


def test_a_glob_is_at_most_max_length_characters() -> None:
    assert Glob.parse("*" * MAX_LENGTH).matches("anything")
    with pytest.raises(ValueError, match=f"at most {MAX_LENGTH} characters"):
        Glob.parse("*" * (MAX_LENGTH + 1))
    with pytest.raises(ValueError, match=re.escape("at most 10 characters (this one has 11)")):
        bounded("x" * 11, 10)
    assert Glob.parse("?" * 5000, max_length=None).matches("x" * 5000)  # one the proxy built


def test_a_glob_is_a_value() -> None:
    assert Glob.parse("/v8/*") == Glob.parse("/v8/*")
    assert str(Glob.parse("/v8/*")) == "/v8/*"


# --- the matcher against the regex it replaces, on small random globs ---------------------


def _reference(pattern: str) -> re.Pattern[str]:
    """The glob as one backtracking regex: what proxy/keys.py's glob_to_regex was, whose
    meaning Glob keeps. Exponential on many stars, exact on small inputs."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[" and (end := pattern.find("]", i + 2)) != -1:
            out.append(_reference_class(pattern[i + 1 : end]))
            i = end + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def _reference_class(body: str) -> str:
    negate = body[:1] in ("^", "!")
    body = body[1:] if negate else body
    items: list[str] = []
    j = 0
    while j < len(body):
        if j + 2 < len(body) and body[j + 1] == "-":
            low, high = sorted((body[j], body[j + 2]))
            items.append(f"{re.escape(low)}-{re.escape(high)}")
            j += 3
        else:
            items.append(re.escape(body[j]))
            j += 1
    if not items:
        return "."
    return f"[{'^' if negate else ''}{''.join(items)}]"


_ATOMS = st.sampled_from(
    ["a", "b", "*", "*", "?", "[", "]", "^", "!", "-", "\\", "\\*", "[ab]", "[^a]", "[]a]"]
)
_globs = st.lists(_ATOMS, max_size=8).map("".join)
_keys = st.text("ab*?[]^!-\\\n", max_size=10)


@settings(max_examples=3000, deadline=None, database=None, derandomize=True)
@given(_globs, _keys)
@example("*?*?", "ab")
@example("a*a", "a")
@example("[]a]*", "]")
@example("\\**\\*", "**")
def test_glob_agrees_with_the_regex_it_replaces(pattern: str, text: str) -> None:
    assert Glob.parse(pattern).matches(text) == bool(_reference(pattern).fullmatch(text))


@pytest.mark.parametrize(
    ("pattern", "prefix"),
    [
        ("GET api /q/*", "GET api /q/"),
        ("abc", "abc"),
        ("*abc", ""),
        ("a?c", "a"),
        ("ab[cd]e", "ab"),
        ("ab[c", "ab[c"),  # an unclosed [ is literal
        ("a\\*b*", "a*b"),  # unescaped
        ("a\\", "a\\"),  # a trailing backslash is itself
        ("* * /v8/" + "a" * 1020 + "b*", ""),
    ],
)
def test_literal_prefix(pattern: str, prefix: str) -> None:
    assert Glob.parse(pattern, max_length=None).literal_prefix == prefix


@settings(max_examples=1000, deadline=None, database=None, derandomize=True)
@given(_globs, _keys)
def test_every_key_a_glob_matches_starts_with_its_literal_prefix(pattern: str, text: str) -> None:
    glob = Glob.parse(pattern)
    assert not glob.matches(text) or text.startswith(glob.literal_prefix)
    literal = glob.literal_prefix + text
    assert Glob.parse(escape_glob(glob.literal_prefix) + "*").matches(literal)


# --- backplane events -----------------------------------------------------------------


async def test_a_backplane_glob_too_long_to_match_leaves_l1_untrusted_not_matched(
    make_proxy: ProxyFactory, upstream: CountingUpstream, redis_server: RedisServer
) -> None:
    proxy = await make_proxy(cache=layered_cache(redis_server.url))
    await proxy.client.get("/quote/AAPL")
    await proxy.deps.store.flush()
    store, key = proxy.deps.store, "GET api /quote/AAPL"

    store.apply(Event("match", "*" * (MAX_EVENT_LENGTH + 1), "other"))
    assert key in proxy.l1  # never matched (it would match every key) ...
    found = await store.lookup(key)
    assert found is not None and found.layer == "l2"  # ... but not a hit until L2 vouches
    found = await store.lookup(key)
    assert found is not None and found.layer == "l1"

    store.apply(Event("match", "*" * MAX_EVENT_LENGTH, "other"))
    assert proxy.l1.peek(key) is None  # gone at once, before the walk (a task) reaches it
    assert key not in proxy.l1


# --- against a real `cacheproxy serve`: where the finding was made ------------------------

KEYS = 10_000
QUERY = "?range=5d&interval=1d&includePrePost=false"  # keys as long as real ones


@asynccontextmanager
async def _filled(upstream: CountingUpstream, redis: RedisServer, tmp_path: Path) -> Any:
    """A layered `cacheproxy serve` on its own Redis, with KEYS distinct entries in L1."""
    prefix = "glob:"
    cache = {**layered_cache(redis.url, prefix), "l1": {"max_entries": 2 * KEYS}}
    served = await spawn_serve(base_config(upstream.url, cache=cache), tmp_path)
    proxy = f"http://127.0.0.1:{served.port}"
    admin = f"http://127.0.0.1:{served.admin_port}"
    try:
        timeout = ClientTimeout(total=10)  # a frozen proxy fails the test, not hangs it
        async with ClientSession(connector=TCPConnector(limit=32), timeout=timeout) as session:
            await _until_up(session, f"{admin}/health", served)
            gate = asyncio.Semaphore(32)

            async def fetch(i: int) -> None:
                async with gate, session.get(f"{proxy}/v8/finance/chart/S{i}{QUERY}") as response:
                    assert response.status == 200
                    await response.read()

            await asyncio.gather(*(fetch(i) for i in range(KEYS)))
            stats = await (await session.get(f"{admin}/stats")).json()
            assert stats["layers"]["l1"]["entries"] == KEYS
            yield session, proxy, admin, prefix, served
    finally:
        if served.process.returncode is None:
            served.process.kill()
            await served.process.wait()


async def _until_up(session: ClientSession, url: str, served: ServeProcess) -> None:
    for _ in range(500):
        with contextlib.suppress(ClientError):
            async with session.get(url) as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.02)  # waiting for another process to start, not for time
    raise AssertionError(served.log.read_text())


async def _hits_while(session: ClientSession, url: str, busy: asyncio.Future[Any]) -> float:
    """Send hits one after another until `busy` is done; the slowest one's seconds."""
    slowest = 0.0
    while not busy.done():
        started = time.perf_counter()
        async with session.get(url) as response:
            assert response.status == 200
            assert response.headers["Cache-Status"].startswith("cacheproxy; hit")
            await response.read()
        slowest = max(slowest, time.perf_counter() - started)
    return slowest


@pytest.mark.slow
async def test_a_thirty_star_glob_over_ten_thousand_keys_does_not_stall_hits(
    upstream: CountingUpstream, redis_proc: RedisServer, tmp_path: Path
) -> None:
    # Generous bounds: this answers in tens of milliseconds. The old regex took 22 s for 8
    # `*?` pairs over 20 keys, ~5x more per pair: the process froze, hits and all.
    async with _filled(upstream, redis_proc, tmp_path) as (session, proxy, admin, _, _):
        hot = f"{proxy}/v8/finance/chart/S1{QUERY}"

        async def every_page() -> list[Any]:
            params = {"pattern": "/" + STARS, "limit": "1000"}
            found: list[Any] = []
            while True:  # L1's walk, then L2's SCAN MATCH pages
                async with session.get(f"{admin}/keys", params=params) as response:
                    assert response.status == 200, await response.text()
                    body = await response.json()
                found += body["keys"]
                if body["next_cursor"] is None:
                    return found
                params["cursor"] = body["next_cursor"]

        started = time.perf_counter()
        listing = asyncio.ensure_future(asyncio.wait_for(every_page(), 30))
        slowest_hit = await _hits_while(session, hot, listing)
        assert await listing == []
        assert time.perf_counter() - started < 5.0
        assert slowest_hit < 2.0

        bad = await session.get(f"{admin}/keys", params={"pattern": "/" + "*" * 1024})
        assert bad.status == 400
        assert "at most 1024 characters" in (await bad.json())["detail"]


@pytest.mark.slow
async def test_a_malicious_backplane_glob_does_not_stall_the_instance(
    upstream: CountingUpstream, redis_proc: RedisServer, tmp_path: Path
) -> None:
    async with _filled(upstream, redis_proc, tmp_path) as (session, proxy, admin, prefix, served):
        hot = f"{proxy}/v8/finance/chart/S1{QUERY}"
        client = Redis.from_url(redis_proc.url)
        try:
            for glob in ("* * /" + STARS, "* * /" + "*?" * 1024):  # slow before; too long
                await client.publish(prefix + CHANNEL, Event("match", glob, "evil").encode())
            # Then a real purge, of S2 and S2x, S2xx, S2xxx (1,111 keys): applied after them.
            purge = Event("match", "* * /v8/finance/chart/S2*", "other")
            await client.publish(prefix + CHANNEL, purge.encode())
        finally:
            await client.aclose()

        async def purged() -> dict[str, Any]:
            while True:
                stats = await (await session.get(f"{admin}/stats")).json()
                layers = stats["layers"]
                if layers["l2"]["backplane"]["received"] == 3 and (
                    layers["l1"]["entries"] == KEYS - 1111  # the walk runs in slices
                ):
                    return stats
                await asyncio.sleep(0.02)  # waiting for the other process

        applied = asyncio.ensure_future(asyncio.wait_for(purged(), 30))
        slowest_hit = await _hits_while(session, hot, applied)
        stats = await applied
        assert stats["layers"]["l1"]["entries"] == KEYS - 1111
        assert stats["layers"]["l2"]["backplane"]["connected"]
        assert slowest_hit < 2.0  # generous: the old regex froze the instance for hours
        assert "not matching a backplane purge pattern: at most" in served.log.read_text()
