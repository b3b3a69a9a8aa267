"""proxy/entry.py: the byte encoding round-trips, and anything else is CorruptEntry."""

from __future__ import annotations

import json
import random
import struct

import pytest

from proxy.entry import MAGIC, VERSION, CachedResponse, decode, encode
from proxy.errors import CorruptEntry

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
        CachedResponse(status=599, headers=(("", ""),), body=b"\x00" * 3, stored_at=-1.0, ttl=1e9),
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
}


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
