"""proxy/entry.py: the byte encoding round-trips, and anything else is CorruptEntry."""

from __future__ import annotations

import asyncio
import json
import math
import random
import struct
from dataclasses import replace

import pytest
from conftest import Proxy, ProxyFactory, RedisServer, layered_cache
from redis.asyncio import Redis

from proxy.entry import MAGIC, VERSION, CachedResponse, decode, encode
from proxy.errors import CorruptEntry
from proxy.policy import STORABLE_STATUS

HEAD = struct.Struct(">2sBHddddddII")

SAMPLE = CachedResponse(
    status=200,
    headers=(("Content-Type", "application/json"), ("Link", "<a>"), ("Link", "<b>")),
    body=b'{"chart": {"result": []}}',
    stored_at=1_700_000_000.123456,
    ttl=300.0,
    initial_age=12.0,
    route="chart_5d",
    tags=("symbol=AAPL",),
)


@pytest.mark.parametrize(
    "entry",
    [
        SAMPLE,
        CachedResponse(status=204, headers=(), body=b"", stored_at=0.0, ttl=0.0),
        CachedResponse(
            status=404,
            headers=(("X-Note", "Zürich / 東京 / 🚀"),),
            body="ünïcødé ✓".encode(),
            stored_at=1.5,
            ttl=60.5,
            route="rüte",
            tags=("symbol=^GSPC", "name=Ünïcødé", 'q="quoted"\\'),
        ),
        CachedResponse(
            status=200,
            headers=tuple((f"X-H{i}", "v" * i) for i in range(50)),
            body=bytes(range(256)) * 40_000,  # ~10 MB, every byte value
            stored_at=1_700_000_000.0,
            ttl=3600.0,
            initial_age=1e6,
            route="big",
            tags=tuple(f"t{i}={i}" for i in range(20)),
        ),
        CachedResponse(
            status=410,
            headers=(("X", ""),),
            body=b"\x00" * 3,
            stored_at=0.0,
            ttl=2.0**31,
            initial_age=2.0**31,
            grace=2.0**31,
            keep=2.0**31,
            revalidate=2.0**31,
        ),
    ],
    ids=["sample", "empty", "unicode", "large", "edges"],
)
def test_round_trip(entry: CachedResponse) -> None:
    data = encode(entry)
    assert data[:2] == MAGIC
    assert data[2] == VERSION
    assert decode(data) == entry


def test_encoding_is_deterministic() -> None:
    assert encode(SAMPLE) == encode(SAMPLE)


def _with_head(data: bytes, **fields: object) -> bytes:
    names = (
        "magic", "version", "status", "stored_at", "ttl", "grace", "keep", "revalidate",
        "initial_age", "meta", "body",
    )  # fmt: skip
    values = dict(zip(names, HEAD.unpack_from(data), strict=True))
    values.update(fields)
    return HEAD.pack(*values.values()) + data[HEAD.size :]


def _with_meta(meta: bytes, body: bytes = b"body") -> bytes:
    head = HEAD.pack(MAGIC, VERSION, 200, 1.0, 60.0, 0.0, 0.0, 0.0, 0.0, len(meta), len(body))
    return head + meta + body


GOOD = encode(SAMPLE)

CORRUPT = {
    "empty": b"",
    "one-byte": b"C",
    "truncated-header": GOOD[: HEAD.size - 1],
    "header-only": GOOD[: HEAD.size],
    "truncated-meta": GOOD[: HEAD.size + 5],
    "truncated-body": GOOD[:-1],
    "trailing-garbage": GOOD + b"x",
    "wrong-magic": b"XX" + GOOD[2:],
    "lowercase-magic": b"cp" + GOOD[2:],
    "wrong-version": _with_head(GOOD, version=VERSION + 1),
    "version-zero": _with_head(GOOD, version=0),
    "meta-length-too-big": _with_head(GOOD, meta=10**6),
    "body-length-too-big": _with_head(GOOD, body=len(SAMPLE.body) + 1),
    "body-length-too-small": _with_head(GOOD, body=len(SAMPLE.body) - 1),
    "meta-not-json": _with_meta(b"{not json"),
    "meta-not-utf8": _with_meta(b"\xff\xfe\xfd"),
    "meta-empty": _with_meta(b""),
    "meta-list": _with_meta(b"[]"),
    "meta-string": _with_meta(b'"h"'),
    "meta-null": _with_meta(b"null"),
    "meta-missing-keys": _with_meta(b"{}"),
    "meta-missing-tags": _with_meta(b'{"h":[],"r":""}'),
    "meta-headers-not-list": _with_meta(b'{"h":5,"r":"","t":[]}'),
    "meta-header-not-pair": _with_meta(b'{"h":[["a"]],"r":"","t":[]}'),
    "meta-header-triple": _with_meta(b'{"h":[["a","b","c"]],"r":"","t":[]}'),
    "meta-header-number": _with_meta(b'{"h":[1],"r":"","t":[]}'),
    "meta-tags-null": _with_meta(b'{"h":[],"r":"","t":null}'),
    "meta-deeply-nested": _with_meta(b"[" * 100_000 + b"]" * 100_000),
    "json-of-whole-entry": json.dumps({"status": 200}).encode(),
    "header-with-crlf": _with_meta(b'{"h":[["X","a\\r\\nSet-Cookie: x=1"]],"r":"","t":[]}'),
    "header-name-with-lf": _with_meta(b'{"h":[["X\\nY","a"]],"r":"","t":[]}'),
    # Names that are not tokens: parsers disagree on `Content-Length : 5` (RFC 9112 5.1).
    "header-name-empty": _with_meta(b'{"h":[["","a"]],"r":"","t":[]}'),
    "header-name-with-space": _with_meta(b'{"h":[["Content-Length ","4"]],"r":"","t":[]}'),
    "header-name-with-colon": _with_meta(b'{"h":[["X:Y","a"]],"r":"","t":[]}'),
    # Statuses the proxy never stores (policy.STORABLE_STATUS): 0, informational, switching
    # protocols, 5xx, out of range.
    **{f"status-{n}": _with_head(GOOD, status=n) for n in (0, 100, 101, 206, 304, 500, 599, 999)},
    "no-content-with-body": _with_head(GOOD, status=204),
    # Times no proxy writes (review of issue 11): an infinite ttl never leaves L1, a huge one
    # overflows Age and Date on every hit, NaN compares false with everything.
    **{
        f"{name}-{value!r}": _with_head(GOOD, **{name: value})
        for name in ("stored_at", "ttl", "grace", "keep", "revalidate", "initial_age")
        for value in (math.inf, -math.inf, math.nan, -1.0, 2.0**40)
    },
}


def _entry_with(headers: list[list[str]]) -> bytes:
    return _with_meta(json.dumps({"h": headers, "r": "", "t": []}).encode(), b"<html>")


@pytest.mark.parametrize(
    "name",
    ["Content-Length", "Transfer-Encoding", "connection", "Keep-Alive", "TE", "Trailer",
     "Upgrade", "Proxy-Connection", "Proxy-Authenticate", "Proxy-Anything"],
)  # fmt: skip
def test_decode_drops_framing_and_hop_by_hop_headers(name: str) -> None:
    data = _entry_with([["Content-Type", "text/html"], [name, "5"], ["ETag", '"a"']])
    assert decode(data).headers == (("Content-Type", "text/html"), ("ETag", '"a"'))


def test_decode_drops_the_headers_connection_names() -> None:
    data = _entry_with([["Connection", "X-Secret, close"], ["X-Secret", "1"], ["X-Ok", "1"]])
    assert decode(data).headers == (("X-Ok", "1"),)


@pytest.mark.parametrize("status", sorted(STORABLE_STATUS - {204}))
def test_every_storable_status_decodes(status: int) -> None:
    assert decode(_with_head(GOOD, status=status)).status == status


@pytest.mark.parametrize("data", CORRUPT.values(), ids=CORRUPT.keys())
def test_decode_rejects_with_corrupt_entry(data: bytes) -> None:
    with pytest.raises(CorruptEntry):
        decode(data)


def test_decode_of_every_truncation_is_corrupt_entry() -> None:
    for end in range(len(GOOD)):
        with pytest.raises(CorruptEntry):
            decode(GOOD[:end])


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_are_corrupt_entry(seed: int) -> None:
    rng = random.Random(seed)
    with pytest.raises(CorruptEntry):
        decode(rng.randbytes(rng.randrange(0, 400)))


@pytest.mark.parametrize("seed", range(20))
def test_flipped_bytes_decode_or_raise_corrupt_entry_only(seed: int) -> None:
    rng = random.Random(seed)
    data = bytearray(GOOD)
    for _ in range(rng.randrange(1, 6)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    try:
        result = decode(bytes(data))
    except CorruptEntry:
        return
    assert isinstance(result, CachedResponse)


# --- crafted entries in a real Redis, served through a real proxy over a raw socket -------

INJECTED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nSet-Cookie: session=evil\r\n\r\ninjected"


async def _served_from_crafted(
    make_proxy: ProxyFactory, redis_proc: RedisServer, crafted: CachedResponse
) -> tuple[Proxy, bytes, bytes | None]:
    """Write `crafted` (its stored_at counted from the proxy's now) into L2 under the key
    GET /quote/X looks up, ask for it on a raw
    connection; the proxy, every byte that came back, and what L2 holds afterwards."""
    cache = layered_cache(redis_proc.url)
    entry_key = f"{cache['redis']['key_prefix']}e:GET api /quote/X"
    proxy = await make_proxy(cache=cache)
    redis = Redis.from_url(redis_proc.url)
    try:
        stored_at = proxy.clock() + crafted.stored_at  # crafted: how far from now
        await redis.set(entry_key, encode(replace(crafted, stored_at=stored_at)), px=60_000)
        server = proxy.client.server
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"GET /quote/X HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 5)  # all of it, until the proxy closes
        writer.close()
        await proxy.deps.store.flush()
        return proxy, raw, await redis.get(entry_key)
    finally:
        await redis.aclose()


def _one_response(raw: bytes) -> tuple[bytes, dict[str, str], bytes]:
    """Status line, fields and body of the one response `raw` must be, framed by its own
    Content-Length with nothing after it."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        assert name.lower() not in fields, f"{name} twice"
        fields[name.lower()] = value.strip()
    assert "transfer-encoding" not in fields
    assert int(fields["content-length"]) == len(rest), "bytes after the body: a second response"
    return lines[0].encode(), fields, rest


def _crafted(**kw: object) -> CachedResponse:
    values: dict[str, object] = {"status": 200, "headers": (("Content-Type", "text/plain"),),
                                 "body": b"hello", "stored_at": 0.0, "ttl": 3600.0,
                                 "route": "quote", **kw}  # fmt: skip
    return CachedResponse(**values)  # type: ignore[arg-type]


async def test_a_crafted_content_length_cannot_smuggle_a_second_response(
    make_proxy: ProxyFactory, redis_proc: RedisServer
) -> None:
    body = b"hello" + INJECTED
    crafted = _crafted(headers=(("Content-Type", "text/plain"), ("Content-Length", "5")), body=body)
    _, raw, _ = await _served_from_crafted(make_proxy, redis_proc, crafted)
    status, fields, served = _one_response(raw)
    assert status == b"HTTP/1.1 200 OK"
    assert served == body  # the body is what it is: its length is recomputed from it
    assert "set-cookie" not in fields


@pytest.mark.parametrize(
    "framing",
    [("Transfer-Encoding", "chunked"), ("Connection", "close, X-A"), ("Upgrade", "h2c"),
     ("Keep-Alive", "timeout=1"), ("Trailer", "X-A"), ("Proxy-Connection", "keep-alive")],
)  # fmt: skip
async def test_crafted_framing_headers_are_dropped(
    make_proxy: ProxyFactory, redis_proc: RedisServer, framing: tuple[str, str]
) -> None:
    headers = (("Content-Type", "text/plain"), framing, ("X-A", "1"))
    _, raw, _ = await _served_from_crafted(make_proxy, redis_proc, _crafted(headers=headers))
    _, fields, served = _one_response(raw)
    assert served == b"hello"
    name = framing[0].lower()
    assert fields["connection"] == "close"  # ours (the client asked to close), not the entry's
    if name == "connection":
        assert "x-a" not in fields  # what the stored Connection named is hop-by-hop too
    else:
        assert name not in fields


@pytest.mark.parametrize(
    "fields",
    [
        # Statuses the proxy never stores.
        *({"status": n} for n in (0, 101, 999, 500, 206)),
        # Times no proxy writes (review of issue 11): a 500 on every hit (Age, Date
        # overflow), an entry that never leaves L1, or one stored after any purge could be.
        {"stored_at": 3600.0}, {"ttl": math.inf}, {"initial_age": math.inf},
        {"grace": math.nan}, {"ttl": 1e300},
    ],
    ids=lambda fields: "-".join(f"{k}={v}" for k, v in fields.items()),
)  # fmt: skip
async def test_a_crafted_entry_is_corrupt_counted_and_replaced(
    make_proxy: ProxyFactory, redis_proc: RedisServer, fields: dict[str, float]
) -> None:
    proxy, raw, after = await _served_from_crafted(make_proxy, redis_proc, _crafted(**fields))
    status_line, _, served = _one_response(raw)
    assert status_line == b"HTTP/1.1 200 OK"
    assert served == b'{"ok": true}'  # the upstream's answer: the crafted entry was a miss
    assert proxy.deps.store.remotes[0].stats.corrupt == 1
    assert after is not None and decode(after).body == b'{"ok": true}'  # deleted, refetched


def test_an_entry_stored_in_the_future_is_corrupt_for_a_reader_with_a_clock() -> None:
    # A stored_at ahead of every clock makes an entry immune to every purge by time (bans).
    now = 1_700_000_000.0
    ahead = _with_head(GOOD, stored_at=now + 3600)
    assert decode(ahead).stored_at == now + 3600  # the pure decoder has no clock
    with pytest.raises(CorruptEntry):
        decode(ahead, now)
    assert decode(_with_head(GOOD, stored_at=now + 30), now).stored_at == now + 30  # skew
