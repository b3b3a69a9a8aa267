"""Encoding simulated responses: our own gzip and a small cache of built bodies."""

from __future__ import annotations

import gzip
from collections import OrderedDict
from collections.abc import Callable, Hashable

from aiohttp import web


def accepts_gzip(header: str) -> bool:
    """Whether an Accept-Encoding value allows gzip (an explicit q=0 refuses it)."""
    for part in header.split(","):
        name, *params = (p.strip() for p in part.split(";"))
        if name.lower() != "gzip":
            continue
        q = next((p[2:] for p in params if p.lower().startswith("q=")), "1")
        try:
            return float(q) > 0
        except ValueError:
            return False
    return False


def gzip_body(body: bytes) -> bytes:
    """body gzipped at level 6 with a zero mtime, so equal bodies compress to equal bytes."""
    return gzip.compress(body, compresslevel=6, mtime=0)


def reply(
    request: web.Request,
    body: bytes,
    cache_control: str,
    status: int = 200,
    content_type: str = "application/json",
    compress: Callable[[bytes], bytes] = gzip_body,
) -> web.Response:
    """A response compressed by us rather than aiohttp, so the bytes are reproducible."""
    headers = {"Cache-Control": cache_control, "Vary": "Accept-Encoding"}
    if status >= 400:
        headers["Expires"] = "-1"
    if accepts_gzip(request.headers.get("Accept-Encoding", "")):
        body = compress(body)
        headers["Content-Encoding"] = "gzip"
    return web.Response(
        body=body, status=status, headers=headers, content_type=content_type, charset="utf-8"
    )


class BodyCache:
    """Recently built bodies and their gzip forms, bounded by total bytes."""

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._size = 0
        self._items: OrderedDict[Hashable, tuple[bytes, int]] = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], bytes], weight: int = 0) -> bytes:
        """The value stored under key, built and stored on a miss."""
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
            return hit[0]
        value = build()
        cost = len(value) + weight
        self._items[key] = (value, cost)
        self._size += cost
        while self._size > self._max and len(self._items) > 1:
            self._size -= self._items.popitem(last=False)[1][1]
        return value

    def gzip(self, body: bytes) -> bytes:
        """body gzipped, reusing the last compression of an equal body."""
        return self.get(("gzip", body), lambda: gzip_body(body), weight=len(body))
