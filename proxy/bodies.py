"""Response bodies written in bounded pieces, each once the client has taken the ones before,
and gzip inflated on the way for clients that refuse it: a slow reader holds a chunk or two
of a body in memory, never a copy of it or its whole inflated form (issue 11, finding 6)."""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from aiohttp import web

log = logging.getLogger(__name__)

CHUNK: Final = 64 * 1024  # bytes read or written at a time when streaming bodies

# A gzip body is inflated for a client that refuses gzip only up to this many bytes, and only
# up to MAX_RATIO times its compressed size (but always up to RATIO_FLOOR): past either, the
# client gets the body as stored, labelled `Content-Encoding: gzip`. Never a 502: the entry
# is a good answer, and gzip is what its origin chose to send. The caps bound the CPU one
# hit costs (a 61 KB bomb would otherwise be 60 MB of inflating per request).
MAX_INFLATED: Final = 64 * 1024 * 1024
MAX_RATIO: Final = 100  # JSON and HTML compress 5-20x; 1000x is a bomb
RATIO_FLOOR: Final = 1024 * 1024
GZIP_WBITS: Final = 16 + zlib.MAX_WBITS


def inflate_limit(compressed: int) -> int:
    """How many bytes a gzip body of `compressed` bytes may inflate to here."""
    return min(MAX_INFLATED, max(RATIO_FLOOR, MAX_RATIO * compressed))


def gunzip(body: bytes) -> Iterator[bytes]:
    """A gzip body's inflated bytes, at most CHUNK at a time, every member of it (RFC 1952
    2.2). zlib.error when it is broken or cut short: a truncated body never passes for whole.
    Input goes in CHUNK-sized views too: zlib keeps what it did not take (`unconsumed_tail`)
    as a copy, which for the whole body would be a copy per request."""
    view = memoryview(body)
    inflater = zlib.decompressobj(GZIP_WBITS)
    for start in range(0, len(view), CHUNK):
        data: bytes | memoryview = view[start : start + CHUNK]
        while data:
            if inflater.eof:  # another member follows
                inflater = zlib.decompressobj(GZIP_WBITS)
            if piece := inflater.decompress(data, CHUNK):
                yield piece
            data = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
    while not inflater.eof:  # output zlib still holds, with all input taken
        if not (piece := inflater.decompress(b"", CHUNK)):
            raise zlib.error("the gzip body is cut short")
        yield piece


@dataclass(frozen=True, slots=True)
class Inflated:
    """What a gzip body inflates to: `size` bytes, or None when it is not to be inflated
    (past inflate_limit, broken, or cut short), so it is served as stored."""

    size: int | None


def measure(body: bytes) -> Inflated:
    """Inflate once, counting and keeping nothing, to know the length before any header is
    sent; stops as soon as the body passes its limit."""
    limit = inflate_limit(len(body))
    size = 0
    try:
        for piece in gunzip(body):
            size += len(piece)
            if size > limit:
                log.warning("a %d-byte gzip body inflates past %d bytes: served compressed",
                            len(body), limit)  # fmt: skip
                return Inflated(None)
    except zlib.error as e:
        log.warning("a gzip body does not inflate (%s): served as stored", e)
        return Inflated(None)
    return Inflated(size)


def pieces(body: bytes) -> Iterator[memoryview]:
    """The body in CHUNK-sized views: no copy is made of it."""
    view = memoryview(body)
    for start in range(0, len(view), CHUNK):
        yield view[start : start + CHUNK]


async def write_pieces(
    write: Callable[[bytes | memoryview], Awaitable[None]], parts: Iterable[bytes | memoryview]
) -> None:
    """Write each part once the client has taken all but 64 KiB of what went before (aiohttp's
    writer drains past that), so the transport buffers a piece or two, not the whole body.
    It yields between pieces too, so a fast reader of a long body does not hold the loop."""
    for part in parts:
        await write(part)
        await asyncio.sleep(0)


class BodyResponse(web.StreamResponse):
    """A response with a body in memory, written in pieces with backpressure (aiohttp's
    Response writes it in one piece, joined to the head: a copy per request, held until a slow
    client takes it). `inflated`: the body is gzip, written inflated to that many bytes."""

    def __init__(
        self,
        request: web.BaseRequest,
        status: int,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        inflated: int | None = None,
    ) -> None:
        super().__init__(status=status, headers=list(headers))
        self._body_bytes = body
        self._inflated = inflated
        # RFC 9110 9.3.2, 6.4.1: HEAD, 204 and 304 carry no content.
        self._empty = request.method == "HEAD" or status in (204, 304)
        self.content_length = len(body) if inflated is None else inflated

    async def write_eof(self, data: bytes = b"") -> None:
        if not self._empty and not self._eof_sent:
            body = self._body_bytes
            parts = pieces(body) if self._inflated is None else gunzip(body)
            await write_pieces(self.write, parts)
        await super().write_eof()
