"""Fuzzing with hypothesis: cache keys, entry decoding, config loading and header parsing.

Each target states a property the module promises and lets hypothesis look for a
counterexample. Bugs it found are pinned by plain regression tests in the module's own test
file (tests/test_keys.py, tests/test_config.py, ...); the @example lines here keep the
smallest inputs that once failed.

CI runs derandomized (the same examples every run) and nothing writes a .hypothesis
directory. Locally, `CI= pytest tests/test_fuzz.py` explores new examples each run.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import struct
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy import origin
from proxy.config import Config, load_config, parse_config
from proxy.entry import CachedResponse, decode, encode
from proxy.errors import BadRequest, ConfigError, CorruptEntry
from proxy.glob import Glob
from proxy.headers import end_to_end
from proxy.keys import CacheKey, Target, escape_glob, parse_target
from proxy.policy import STORABLE_STATUS
from proxy.routes import RouteTable, compile_template
from proxy.units import parse_duration, parse_size

settings.register_profile(
    "cacheproxy-fuzz",
    deadline=None,  # a shared 2-core machine: timing is not what we test
    database=None,  # no .hypothesis directory in the tree
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=False,
)
_PROFILE = settings.get_profile("cacheproxy-fuzz")


def fuzz(examples: int) -> settings:
    """The fuzz profile with a per-target budget (the whole file stays within seconds)."""
    return settings(_PROFILE, max_examples=examples)


SHIPPED = Path(__file__).resolve().parent.parent / "config" / "proxy.yaml"

# --- keys: a URL's meaning, and the many ways a client may spell it ------------------------

IGNORE = frozenset({"_", "crumb"})
SECRET = frozenset({"apikey", "token"})
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PATH_LITERAL = _UNRESERVED | frozenset(b"!$&'()*+,;=:@")  # RFC 3986 pchar
_QUERY_LITERAL = _UNRESERVED | frozenset(b"!$'()*,;:@/?")  # "&", "=", "+" are structure
_FORBIDDEN = re.compile(rb"[\x00-\x1f\x7f\\]")

# A component is text (spelled raw or percent-encoded) or arbitrary bytes (not always UTF-8).
_component = st.one_of(
    st.text(max_size=8).map(str.encode),
    st.binary(max_size=6),
    st.sampled_from([b"a", b"5d", b"AAPL", b"^GSPC", b"a b", b"a+b", b"a=b", b"a&b", b"%", b"~"]),
)


def _path_segment_ok(data: bytes) -> bool:
    try:
        data.decode()  # a path is UTF-8 once percent-decoded (issue 11 #13); a query may not be
    except UnicodeDecodeError:
        return False
    return not _FORBIDDEN.search(data) and not {b".", b".."} & set(data.split(b"/"))


_segments = st.lists(_component.filter(_path_segment_ok), min_size=1, max_size=5).filter(
    lambda s: s[0] != b"" or len(s) == 1  # "//x" is authority-form: refused, not a path
)
_names = st.one_of(
    st.sampled_from([b"range", b"interval", b"symbol", b"a", b"A", b"apikey", b"token"]),
    _component,
)
_pair = st.tuples(_names, st.none() | _component).filter(lambda p: p != (b"", None))
_query = st.lists(_pair, max_size=6)

Model = tuple[tuple[bytes, ...], tuple[tuple[bytes, bytes | None], ...]]


@st.composite
def url_models(draw: st.DrawFn) -> Model:
    """A URL as what it means: decoded path segments and decoded (name, value) pairs."""
    return tuple(draw(_segments)), tuple(draw(_query))


def meaning(model: Model) -> tuple[Any, ...]:
    """What the key must capture: the path, and per kept name the values in order."""
    segments, pairs = model
    values: dict[bytes, list[bytes | None]] = defaultdict(list)
    for name, value in pairs:
        if name.decode("utf-8", "replace") not in IGNORE:
            values[name].append(value)
    return segments, sorted(values.items())


@st.composite
def spell(draw: st.DrawFn, data: bytes, literal: frozenset[int], query: bool) -> str:
    """One of the equivalent spellings of `data` in a request target.

    Bytes allowed literally may be literal or percent-encoded in either case; in a query a
    space may be "+"; text outside ASCII may come raw. Bytes that are not UTF-8 are
    percent-encoded (raw, they are not a valid target: see test_parse_target_...).
    """
    out: list[str] = []
    text = data.decode("utf-8", "surrogateescape")
    for char in text:
        code = ord(char)
        how = draw(st.integers(0, 3))
        if code < 0x80 and code in literal and how == 0:
            out.append(char)
        elif query and char == " " and how == 0:
            out.append("+")
        elif code >= 0x80 and not 0xD800 <= code <= 0xDFFF and how == 1:
            out.append(char)  # raw UTF-8
        else:
            raw = char.encode("utf-8", "surrogateescape")
            out.append("".join(f"%{b:02X}" if how != 2 else f"%{b:02x}" for b in raw))
    return "".join(out)


@st.composite
def spellings(draw: st.DrawFn, model: Model) -> str:
    """A request target for the model: any spelling, distinct names shuffled (a repeated
    name keeps the order of its values), ignored parameters and empty parts sprinkled in."""
    segments, pairs = model
    path = "/" + "/".join(draw(spell(s, _PATH_LITERAL, query=False)) for s in segments)
    parts: list[tuple[bytes, str]] = []
    for name, value in pairs:
        text = draw(spell(name, _QUERY_LITERAL, query=True))
        if value is not None:
            text += "=" + draw(spell(value, _QUERY_LITERAL, query=True))
        parts.append((name, text))
    # Shuffle, keeping each name's values in their order: pick names, emit their next value.
    by_name: dict[bytes, list[str]] = defaultdict(list)
    for name, text in parts:
        by_name[name].append(text)
    order = draw(st.permutations([name for name, _ in parts]))
    shuffled = [by_name[name].pop(0) for name in order]
    for _ in range(draw(st.integers(0, 3))):
        noise = draw(
            st.sampled_from(["_=1700000000123", "crumb=Xy7", "%5F=1", "_", "crumb", "", "_=a+b"])
        )
        shuffled.insert(draw(st.integers(0, len(shuffled))), noise)
    target = path + ("?" + "&".join(shuffled) if shuffled or draw(st.booleans()) else "")
    if draw(st.booleans()):
        target += "#" + draw(st.text(max_size=4))  # a fragment is never part of the key
    return target


def key_of(target: str, headers: tuple[tuple[str, str], ...] = ()) -> str:
    return make_key("GET", "api", parse_target(target), IGNORE, SECRET, headers).text


def make_key(
    method: str, upstream: str, target: Target, ignore: frozenset[str], secret: frozenset[str],
    headers: tuple[tuple[str, str], ...] | list[tuple[str, str]] = (),
) -> CacheKey:  # fmt: skip
    return CacheKey.of(method, upstream, target, ignore, secret).with_headers(headers)


@st.composite
def mutated(draw: st.DrawFn, model: Model) -> Model:
    """The model with one small change, which may or may not change its meaning."""
    segments, pairs = list(model[0]), list(model[1])
    what = draw(st.sampled_from(["segment", "add", "drop", "value", "swap", "bare", "path"]))
    if what == "segment":
        i = draw(st.integers(0, len(segments) - 1))
        segments[i] = draw(_component.filter(_path_segment_ok))
    elif what == "path":
        segments.append(draw(_component.filter(_path_segment_ok)))
    elif what == "add":
        pairs.insert(draw(st.integers(0, len(pairs))), draw(_pair))
    elif pairs and what == "drop":
        pairs.pop(draw(st.integers(0, len(pairs) - 1)))
    elif pairs and what == "value":
        i = draw(st.integers(0, len(pairs) - 1))
        pairs[i] = (pairs[i][0], draw(st.none() | _component))
    elif len(pairs) > 1 and what == "swap":
        i, j = draw(st.permutations(range(len(pairs))))[:2]
        pairs[i], pairs[j] = pairs[j], pairs[i]
    elif pairs and what == "bare":  # `?a` against `?a=`
        i = draw(st.integers(0, len(pairs) - 1))
        name, value = pairs[i]
        pairs[i] = (name, None if value == b"" else b"" if value is None else value)
    if segments[0] == b"" and len(segments) > 1:
        segments[0] = b"x"
    return tuple(segments), tuple((n, v) for n, v in pairs if (n, v) != (b"", None))


@fuzz(300)
@given(st.data(), url_models())
def test_equivalent_spellings_share_one_key(data: st.DataObject, model: Model) -> None:
    first, second = data.draw(spellings(model)), data.draw(spellings(model))
    assert key_of(first) == key_of(second), (first, second)


@fuzz(400)
@given(st.data(), url_models())
def test_keys_differ_exactly_when_the_meaning_differs(data: st.DataObject, model: Model) -> None:
    other = data.draw(mutated(model))
    first, second = data.draw(spellings(model)), data.draw(spellings(other))
    same_meaning = meaning(model) == meaning(other)
    assert (key_of(first) == key_of(second)) == same_meaning, (first, second)


@fuzz(300)
@given(
    st.text(max_size=30).map(lambda s: "/" + s)
    | st.text(
        st.characters(exclude_categories=())
        | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=())
    ).map(lambda s: "/" + s)
    | st.text()
)
@example("/\udcff").via("a raw 0xFF byte, as aiohttp's parser decodes it (surrogateescape)")
@example("/a?b=\udcff")
@example("/\ud800")
def test_parse_target_refuses_with_bad_request_only(raw: str) -> None:
    try:
        target = parse_target(raw)
    except BadRequest:
        return
    key = make_key("HEAD", "api", target, IGNORE, frozenset())
    method, upstream, url = key.text.split(" ")  # spaces never occur inside a field
    assert (method, upstream, CacheKey.parse(key.text).url) == ("GET", "api", url)
    assert url.isascii() and url.isprintable()
    assert make_key("GET", "api", parse_target(url), IGNORE, frozenset()) == key  # idempotent


_secret_names = st.text(min_size=1, max_size=8).filter(lambda s: s not in IGNORE)


@fuzz(200)
@given(
    st.data(),
    st.sets(_secret_names, min_size=1, max_size=3),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=12, max_size=24),
)
@example(None, {"auth[token]"}, "s3cr3tvalue0000")  # a name that percent-encoding changes
def test_secret_query_values_never_appear_in_keys(
    data: st.DataObject | None, secret: set[str], value: str
) -> None:
    name = next(iter(sorted(secret)))
    if data is None:
        spelled_name = quote(name, safe="")
    else:
        spelled_name = data.draw(spell(name.encode(), _QUERY_LITERAL, query=True))
    target = parse_target(f"/q?{spelled_name}={value}&range=5d")
    key = make_key("GET", "api", target, IGNORE, frozenset(secret)).text
    assert value not in key, key


_header_names = st.sampled_from(
    ["accept-language", "x-region", "authorization", "cookie", "x-api-key", "x-auth-token"]
)
_header_values = st.text(max_size=12) | st.text(
    st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF, exclude_categories=()), max_size=3
)  # aiohttp hands over non-UTF-8 header bytes as lone surrogates (surrogateescape)


@fuzz(300)
@given(st.lists(st.tuples(_header_names, _header_values), max_size=4), st.data())
@example([("accept-language", "\udcff")], None).via("a raw 0xFF byte in a key header")
@example([("authorization", "\udcff")], None)
def test_key_header_parts_are_injective_and_hide_credentials(
    headers: list[tuple[str, str]], data: st.DataObject | None
) -> None:
    plain = CacheKey("GET", "api", "/x")
    keyed = plain.with_headers(headers)
    suffix = keyed.text.removeprefix(plain.text)
    assert CacheKey.parse(keyed.text).headers == keyed.headers  # reads back into its parts
    assert suffix.isascii()
    fields = suffix.split(" ")[1:]  # splits back into its parts
    assert len(fields) == len(headers)
    for (name, value), field in zip(headers, fields, strict=True):
        if re.search("auth|cookie|key|token", name):  # a hash, never the credential
            assert re.fullmatch(f"{name}=#[0-9a-f]{{16}}", field), field
        else:
            assert field == f"{name}={quote(value.encode('utf-8', 'surrogatepass'), safe='')}"
    if data is None or not headers:
        return
    i = data.draw(st.integers(0, len(headers) - 1))
    other_value = data.draw(_header_values.filter(lambda v: v != headers[i][1]))
    changed = [*headers[:i], (headers[i][0], other_value), *headers[i + 1 :]]
    assert plain.with_headers(changed) != keyed


@fuzz(300)
@given(st.text(max_size=20), st.text(max_size=20))
@example("a[b]*c?\\", "a[b]xc?\\")
def test_an_escaped_glob_matches_only_itself(text: str, other: str) -> None:
    glob = Glob.parse(escape_glob(text), max_length=None)
    assert glob.matches(text)
    assert glob.matches(other) == (other == text)


@fuzz(300)
@given(st.text(max_size=12) | st.text("ab-^!]\\[*?z", max_size=8))
@example("[z-a]").via("a reversed range")
@example("[^]").via("an empty negated class")
def test_every_glob_parses(pattern: str) -> None:
    Glob.parse(pattern).matches(pattern)  # never re.error: patterns come from admin requests


_glob_char = st.sampled_from("abz")
_glob_class = st.tuples(
    st.sampled_from(["", "^"]),
    st.lists(_glob_char | st.tuples(_glob_char, _glob_char).map("-".join), min_size=1, max_size=3),
).map(lambda c: "[" + c[0] + "".join(c[1]) + "]")
_globs = st.lists(
    _glob_char | st.sampled_from(["*", "?", "-", "\\*", "\\[", "\\a"]) | _glob_class, max_size=6
).map("".join)


@fuzz(500)
@given(_globs, st.text("abz-*[", min_size=1, max_size=6))
@example("[z-a]", "b").via("a reversed range: Redis swaps its ends")
def test_glob_agrees_with_redis(pattern: str, text: str) -> None:
    """L1 (proxy/glob.py) and L2 (Redis MATCH) must purge the same keys for the documented
    glob syntax: `*`, `?`, `[abc]`, `[^abc]`, `[a-c]` and `\\` escapes."""
    assert Glob.parse(pattern).matches(text) == redis_glob_match(pattern, text)


def redis_glob_match(pattern: str, string: str) -> bool:
    """Redis's stringmatchlen (util.c), case-sensitive, as a reference for L1's globs."""
    p, s = 0, 0
    while p < len(pattern) and s < len(string):
        c = pattern[p]
        if c == "*":
            while p + 1 < len(pattern) and pattern[p + 1] == "*":
                p += 1
            if p + 1 == len(pattern):
                return True
            return any(
                redis_glob_match(pattern[p + 1 :], string[i:]) for i in range(s, len(string))
            )
        if c == "?":
            s += 1
        elif c == "[":
            p += 1
            negate = p < len(pattern) and pattern[p] == "^"
            if negate:
                p += 1
            matched = False
            while True:
                if p < len(pattern) and pattern[p] == "\\" and len(pattern) - p >= 2:
                    p += 1
                    matched |= pattern[p] == string[s]
                elif p < len(pattern) and pattern[p] == "]":
                    break
                elif p >= len(pattern):
                    p -= 1
                    break
                elif len(pattern) - p >= 3 and pattern[p + 1] == "-":
                    start, end = sorted((pattern[p], pattern[p + 2]))
                    p += 2
                    matched |= start <= string[s] <= end
                else:
                    matched |= pattern[p] == string[s]
                p += 1
            if negate:
                matched = not matched
            if not matched:
                return False
            s += 1
        else:
            if c == "\\" and len(pattern) - p >= 2:
                p += 1
            if pattern[p] != string[s]:
                return False
            s += 1
        p += 1
        if s == len(string):
            while p < len(pattern) and pattern[p] == "*":
                p += 1
            break
    return p == len(pattern) and s == len(string)


# --- entry: the one serializer --------------------------------------------------------------

HEAD = struct.Struct(">2sBHddddddII")  # entry.py's fixed header
# Mostly times a proxy writes, sometimes any float (refused unless in range).
_times = st.floats(0, 2.0**31) | st.floats(width=64)
_latin1 = st.text(st.characters(max_codepoint=0xFF), max_size=12)
_names = (
    _latin1
    | st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}", fullmatch=True)
    | st.sampled_from(["Content-Length", "Transfer-Encoding", "Connection", "Proxy-X", "TE"])
)
_entries = st.builds(
    CachedResponse,
    status=st.sampled_from(sorted(STORABLE_STATUS)) | st.integers(0, 0xFFFF),
    headers=st.lists(st.tuples(_names, _latin1 | st.text(max_size=12)), max_size=6).map(tuple),
    body=st.binary(max_size=300),
    stored_at=_times,
    ttl=_times,
    initial_age=_times,
    route=st.text(max_size=10),
    tags=st.lists(st.text(max_size=10), max_size=4).map(tuple),
    grace=_times,
    keep=_times,
    revalidate=_times,
)
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")


def _servable(entry: CachedResponse) -> bool:
    """What decode may give back: an entry this proxy could have stored and can serve."""
    return (
        entry.status in STORABLE_STATUS
        and not (entry.status == 204 and entry.body)
        and all(_TOKEN.fullmatch(name) for name, _ in entry.headers)
        and not any(re.search("[\r\n\x00]", name + value) for name, value in entry.headers)
        and 0 <= entry.stored_at <= 2.0**34
        and all(
            0 <= d <= 2.0**31
            for d in (entry.ttl, entry.grace, entry.keep, entry.revalidate, entry.initial_age)
        )
    )


@fuzz(300)
@given(_entries)
def test_entry_round_trips(entry: CachedResponse) -> None:
    data = encode(entry)
    if not _servable(entry):
        with pytest.raises(CorruptEntry):  # L2 bytes are untrusted: refused, never served
            decode(data)
    else:  # and framing is never taken from them (issue 11, finding 7)
        assert decode(data) == dataclasses.replace(entry, headers=tuple(end_to_end(entry.headers)))


def _decode_or_corrupt(data: bytes) -> CachedResponse | None:
    try:
        return decode(data)
    except CorruptEntry:
        return None


@fuzz(300)
@given(st.binary(max_size=200) | st.binary(max_size=80).map(lambda b: b"CP\x03" + b))
def test_arbitrary_bytes_decode_to_corrupt_entry_only(data: bytes) -> None:
    result = _decode_or_corrupt(data)
    assert result is None or isinstance(result, CachedResponse)


@fuzz(300)
@given(_entries, st.data())
def test_mutated_encodings_decode_or_raise_corrupt_entry_only(
    entry: CachedResponse, data: st.DataObject
) -> None:
    raw = bytearray(encode(entry))
    how = data.draw(st.sampled_from(["flip", "truncate", "insert", "meta"]))
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    elif how == "truncate":
        del raw[data.draw(st.integers(0, len(raw) - 1)) :]
    elif how == "insert":
        raw[data.draw(st.integers(0, len(raw))) : 0] = data.draw(st.binary(min_size=1, max_size=8))
    else:  # same lengths, other JSON: decode must still say CorruptEntry or give an entry
        meta = data.draw(st.sampled_from([b'{"h":{"ab":1},"r":1,"t":"x"}', b"[1]", b"1e999"]))
        lengths = HEAD.size - 8  # the header ends with the metadata and body lengths
        end = HEAD.size + int.from_bytes(raw[lengths : lengths + 4], "big")
        raw[HEAD.size : end] = meta
        raw[lengths : lengths + 4] = len(meta).to_bytes(4, "big")
    result = _decode_or_corrupt(bytes(raw))
    assert result is None or isinstance(result, CachedResponse)
    if result is not None and how == "truncate":
        pytest.fail("a truncated encoding decoded")


# --- config: every problem is a ConfigError naming its field --------------------------------

# Values people get wrong: units, overflowing numbers, bad URLs, times, templates, zones.
_ODD: tuple[object, ...] = (
    "5m", "300", "1h", "-5s", "5 m", "1.5d", "250ms", "5mm", "1e3", ".5s", "inf", "nan",
    "9" * 400, "9" * 400 + "GB", "100MB", "٣s", "²", "10/s", "0/s", "9" * 400 + "/s", "origin",
    "${X}", "${X:-1}", "http://[::1", "http://" + "a" * 70 + ".com", "http://a:99999",
    "http://a b", "redis://[::1", "09:30", "25:00", "2026-12-25", "", " ", "GET", "*",
    "/v8/{a}/{a}", "/{", "/x?y", "America/New_York", "Nowhere/Town", "../etc", 10**400,
    float("inf"), float("nan"), -1,
)  # fmt: skip
_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(_ODD)
)
_yaml_values = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=6) | st.integers() | st.none(), children, max_size=4)
    ),
    max_leaves=20,
)


def _check_config_outcome(data: object) -> None:
    try:
        config = parse_config(data, env={})
    except ConfigError as e:
        assert str(e) == (f"{e.path}: {e.message}" if e.path else e.message)
        # Only what is wrong with the top level itself has no field to name.
        top_level = not isinstance(data, dict) or any(not k or not isinstance(k, str) for k in data)
        assert e.path or top_level, e
        return
    assert isinstance(config, Config)
    assert not list(_non_finite(config, "config", set())), list(
        _non_finite(config, "config", set())
    )


def _non_finite(value: object, where: str, seen: set[int]) -> Iterator[str]:
    """Paths of float fields in a loaded config that are NaN or infinite."""
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, float) and not math.isfinite(value):
        yield where
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _non_finite(getattr(value, f.name), f"{where}.{f.name}", seen)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _non_finite(v, f"{where}[{k!r}]", seen)
    elif isinstance(value, RouteTable):
        for i, route in enumerate(value):
            yield from _non_finite(route, f"{where}[{i}]", seen)


_SECTIONS = ("upstreams", "markets", "ttl_classes", "routes", "cache", "server", "warm")


@fuzz(300)
@given(_yaml_values | st.dictionaries(st.sampled_from(_SECTIONS), _yaml_values, max_size=5))
def test_arbitrary_yaml_trees_give_a_config_or_a_config_error(data: object) -> None:
    _check_config_outcome(data)


def _shipped() -> dict[str, Any]:
    tree = yaml.safe_load(SHIPPED.read_text())
    assert isinstance(tree, dict)
    return tree


_SHIPPED_TREE = _shipped()


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _paths(value, (*prefix, i))
    return found


_SHIPPED_PATHS = _paths(_SHIPPED_TREE)


@st.composite
def shipped_mutants(draw: st.DrawFn) -> dict[str, Any]:
    """The shipped config with one to three fields dropped, retyped or given odd values."""
    tree = copy.deepcopy(_SHIPPED_TREE)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_SHIPPED_PATHS))
        parent: Any = tree
        try:
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]]  # an earlier mutation may have removed it
        except (KeyError, IndexError, TypeError):
            continue
        how = draw(st.sampled_from(["drop", "replace", "wrap", "odd"]))
        if how == "drop":
            del parent[path[-1]]
        elif how == "wrap":
            parent[path[-1]] = [parent[path[-1]]]
        else:
            parent[path[-1]] = draw(_scalars if how == "odd" else _yaml_values)
    return tree


@fuzz(400)
@given(shipped_mutants())
def test_mutated_shipped_config_gives_a_config_or_a_config_error(data: dict[str, Any]) -> None:
    _check_config_outcome(data)


@fuzz(200)
@given(
    content=st.binary(max_size=200)
    | _yaml_values.map(lambda v: yaml.safe_dump(v).encode())
    | st.sampled_from(
        [
            b"holidays: [2026-13-45]",
            b"a: &x [*x]",
            b"a: &x {b: *x}",
            b"[" * 2000,
            b"port: " + b"9" * 5000,
            b"\xff\xfe",
            b"x: !!python/object:os.system ls",
            b"x: !!binary '!!'",
        ]
    )
)
@example(content=b"server:\n  port: 80\nupstreams: &u {a: {url: 'http://x'}, b: *u}")
def test_any_file_loads_or_raises_config_error(tmp_path_factory: Any, content: bytes) -> None:
    # tmp_path_factory: hypothesis refuses function-scoped fixtures such as tmp_path
    path = tmp_path_factory.mktemp("fuzz") / "proxy.yaml"
    path.write_bytes(content)
    try:
        config = load_config(path, env={})
    except ConfigError as e:
        assert str(e).startswith(f"{e.path}: ") or not e.path
        return
    assert isinstance(config, Config)


_unit_text = st.text(max_size=12) | st.from_regex(
    r"\A\s?[0-9٣]{1,400}(\.[0-9]{0,3})?\s?(ms|s|m|h|d|b|kb|MB|GiB|g|x)?\Z"
)


@fuzz(400)
@given(_unit_text | st.floats() | st.integers() | st.booleans() | st.none())
@example("9" * 400).via("a float overflow")
@example(float("inf"))
@example(float("nan"))
@example(10**400).via("an integer YAML reads, too large for a float")
def test_units_parse_to_finite_non_negative_values_or_value_error(value: object) -> None:
    for parse in (parse_duration, parse_size):
        try:
            parsed = parse(value)
        except ValueError:
            continue
        assert isinstance(parsed, int) or math.isfinite(parsed), (parse.__name__, value, parsed)
        assert parsed >= 0, (parse.__name__, value, parsed)


# --- origin headers and routes: arbitrary text never raises ---------------------------------

_header_text = st.text(max_size=40) | st.from_regex(
    r"\A(public|private|no-store|max-age|s-maxage|stale-if-error)(=(\"[^\"]*\"?|-?\d{0,12}))?"
    r"(, ?[a-z-]+(=\d{0,12})?){0,3}\Z"
)
_dates = st.text(max_size=40) | st.from_regex(
    r"\A(Mon, )?\d{1,25} (Jan|Feb|Xyz) \d{1,25} \d{1,3}:\d{1,3}(:\d{1,3})? (GMT|[+-]\d{4,6})?\Z"
)


@fuzz(300)
@given(_header_text, _header_text, _dates, _dates, st.integers(0, 999))
@example("max-age=" + "9" * 30, "9" * 30, "Mon, 01 Jan 99999999999999999999 00:00:00 GMT", "", 200)
def test_origin_header_parsing_never_raises(
    cache_control: str, age: str, date: str, other_date: str, status: int
) -> None:
    cc = origin.parse_cache_control(cache_control)
    for value in (*cc.values(), age, age.strip()):
        seconds = origin.delta_seconds(value)
        assert seconds is None or 0 <= seconds <= origin.MAX_DELTA
    assert 0 <= origin.parse_age(age) <= origin.MAX_DELTA
    origin.http_date(date)
    headers = {"Cache-Control": cache_control, "Date": date, "Expires": other_date,
               "Last-Modified": other_date, "Age": age}  # fmt: skip
    assert origin.freshness_lifetime(status, headers, 1_700_000_000.0) >= 0
    assert origin.corrected_initial_age(headers, 1_700_000_000.0, 1_700_000_001.0) >= 0
    origin.stale_windows(cc, 1.0, 2.0)
    conditions = {"If-None-Match": age, "If-Modified-Since": date, "If-Match": cache_control,
                  "If-Unmodified-Since": other_date}  # fmt: skip
    assert origin.precondition(conditions, cache_control, other_date) in (200, 304, 412)


_SHIPPED_CONFIG = parse_config(_SHIPPED_TREE, env={})


@fuzz(300)
@given(
    st.sampled_from(["GET", "HEAD", "POST", "get", ""]),
    st.text(max_size=40) | st.from_regex(r"\A/v8/finance/chart/[^/]{0,8}/?\Z"),
    st.dictionaries(st.sampled_from(["range", "symbol", ""]), st.text(max_size=6), max_size=2),
)
def test_route_matching_never_raises(method: str, path: str, query: dict[str, str]) -> None:
    match = _SHIPPED_CONFIG.routes.match(method, path, query)
    allowed = _SHIPPED_CONFIG.routes.allowed_methods(path)
    assert match is None or method in allowed


_template_parts = st.lists(
    st.sampled_from(["/", "a", "{x}", "{y}", "{x", "}", "-", ".", "(", "*", "\\", "é"]),
    max_size=8,
).map(lambda parts: "/" + "".join(parts))


@fuzz(300)
@given(_template_parts, st.lists(st.text("abc.-é(*", min_size=1, max_size=4), min_size=2))
def test_templates_compile_or_raise_value_error_and_match_what_they_describe(
    template: str, values: list[str]
) -> None:
    try:
        pattern, params = compile_template(template)
    except ValueError:
        return
    path = template
    for name, value in zip(params, values, strict=False):
        path = path.replace("{" + name + "}", value)
    assert pattern.fullmatch(path), (template, path)
