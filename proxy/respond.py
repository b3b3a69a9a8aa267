"""Client responses: from entries, relayed upstream responses, and errors (the one place
errors become HTTP). Each says what happened in Cache-Status (RFC 9211)."""

from __future__ import annotations

import contextlib
import logging
import math
import zlib
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import aiohttp
from aiohttp import HttpVersion11, web
from aiohttp.abc import AbstractStreamWriter

from proxy.bodies import GZIP_WBITS, BodyResponse, Inflated, measure, pieces, write_pieces
from proxy.bodies import MAX_INFLATED as MAX_INFLATED
from proxy.entry import LINE_BREAK, CachedResponse
from proxy.errors import UpstreamError
from proxy.headers import HOP_BY_HOP, end_to_end, is_gzip
from proxy.origin import NOT_MODIFIED_FIELDS, precondition
from proxy.upstream import CHUNK, BodyBroke, refuse_transfer_codings

log = logging.getLogger(__name__)

NAME = "cacheproxy"
Headers = list[tuple[str, str]]


def json_error(
    status: int, error: str, detail: str, cache_status: str | None = None
) -> web.Response:
    """A short JSON error body: `{"error": "no_route", "detail": "..."}`."""
    headers = {"Cache-Status": cache_status} if cache_status else None
    return web.json_response({"error": error, "detail": detail}, status=status, headers=headers)


def upstream_error(error: UpstreamError) -> web.Response:
    """The client response for an upstream failure with nothing stale to stand in."""
    response = json_error(
        error.status,
        f"upstream_{error.kind}",
        str(error),
        f"{NAME}; fwd=miss; fwd-status={error.status}; detail=upstream-{error.kind}",
    )
    if error.retry_after is not None:  # RFC 9110 10.2.3, whole seconds, rounded up
        response.headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    return response


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether gzip is acceptable under RFC 9110 12.5.3 (`gzip;q=0` refuses it)."""
    star: bool | None = None
    for part in accept_encoding.lower().split(","):
        coding, _, params = part.strip().partition(";")
        coding = coding.strip()
        if coding not in ("gzip", "x-gzip", "*"):
            continue
        weight = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        if coding == "*":
            star = weight > 0
        else:
            return weight > 0
    return bool(star)


def _without(headers: Iterable[tuple[str, str]], *names: str) -> Headers:
    drop = {n.lower() for n in names}
    return [(n, v) for n, v in headers if n.lower() not in drop]


def _for_client(
    request: web.BaseRequest, status: int, headers: Headers, body: bytes, inflated: Inflated
) -> BodyResponse:
    """The body as this client can take it: a gzip body that may be inflated (`inflated`
    says) is, for a client that refuses gzip; written in pieces either way."""
    if inflated.size is None:
        return BodyResponse(request, status, headers, body)
    headers = _weak_etags(_without(headers, "Content-Encoding"))
    return BodyResponse(request, status, headers, body, inflated.size)


def _refuses_gzip(request: web.BaseRequest) -> bool:
    return not accepts_gzip(request.headers.get("Accept-Encoding", ""))


_AS_STORED = Inflated(None)


def _weak_etags(headers: Headers) -> Headers:
    """Another encoding is another representation: its ETag may only be weak (RFC 9110 8.8.3)."""
    return [
        (n, "W/" + v.strip() if n.lower() == "etag" and not v.strip().startswith("W/") else v)
        for n, v in headers
    ]


def serve_entry(
    request: web.BaseRequest, entry: CachedResponse, cache_status: str, age: int | None
) -> web.StreamResponse:
    """The client response for an entry, with Cache-Status and (on hits) Age; a 304 when the
    client's If-None-Match / If-Modified-Since say it has this one already."""
    if entry.status == 200 and (outcome := _conditional(request, entry)) != 200:
        if outcome == 412:
            return json_error(
                412, "precondition_failed", "If-Match / If-Unmodified-Since", cache_status
            )
        kept = [(n, v) for n, v in _with_status(entry, cache_status, age)
                if n.lower() in _NOT_MODIFIED_KEEP]  # fmt: skip
        return web.Response(status=304, headers=kept)
    wire = entry.wire or _make_wire(entry)
    inflated = _AS_STORED
    if wire.gzip and _refuses_gzip(request):
        inflated = entry.inflated or _measure(entry)
    if wire.head is not None and request.version == HttpVersion11 and inflated.size is None:
        return WireResponse(request, entry, wire.head, cache_status, age)
    headers = _with_status(entry, cache_status, age)
    return _for_client(request, entry.status, headers, entry.body, inflated)


def _measure(entry: CachedResponse) -> Inflated:
    inflated = measure(entry.body)
    object.__setattr__(entry, "inflated", inflated)  # a cache on the frozen entry, like wire
    return inflated


def _with_status(entry: CachedResponse, cache_status: str, age: int | None) -> Headers:
    headers = [*entry.headers, ("Cache-Status", cache_status)]
    if age is not None:
        headers.append(("Age", str(age)))
    return headers


@dataclass(frozen=True, slots=True)
class Wire:
    """An entry's status line and headers as bytes, made once and reused by every hit."""

    head: bytes | None  # up to and including Content-Length; None: serve through aiohttp
    gzip: bool  # the body is gzip, so clients that refuse gzip may get it inflated


# RFC 9110 6.4.1 and 8.6: these never carry content, so no Content-Length either.
_NO_CONTENT = frozenset({204, 304})


def _make_wire(entry: CachedResponse) -> Wire:
    """Serialize an entry's head once (what aiohttp would write for it on every hit)."""
    head = None
    names = {name.lower() for name, _ in entry.headers}
    lines = [f"{n}: {v}\r\n" for n, v in entry.headers]
    if (
        entry.status >= 200
        and entry.status not in _NO_CONTENT
        and not names & HOP_BY_HOP  # framing is ours to write, never a stored field's
        and not any(LINE_BREAK.search(line, 0, len(line) - 2) for line in lines)
    ):  # a header that could split the response stays with aiohttp, which refuses it
        try:
            reason = HTTPStatus(entry.status).phrase
        except ValueError:
            reason = ""
        if "content-type" not in names and entry.body:  # as aiohttp adds (RFC 9110 8.3)
            lines.append("Content-Type: application/octet-stream\r\n")
        if "date" not in names:  # RFC 9110 6.6.1: the time the response was received
            lines.append(f"Date: {formatdate(entry.stored_at, usegmt=True)}\r\n")
        lines.append(f"Content-Length: {len(entry.body)}\r\n")
        text = f"HTTP/1.1 {entry.status} {reason}\r\n" + "".join(lines)
        with contextlib.suppress(UnicodeEncodeError):
            head = text.encode("utf-8", "surrogateescape")
    wire = Wire(head, "content-encoding" in names and is_gzip(entry.headers))
    object.__setattr__(entry, "wire", wire)  # a cache on the frozen entry, see entry.py
    return wire


class WireResponse(web.StreamResponse):
    """A hit written as prebuilt bytes: the entry's serialized head, then Cache-Status and
    Age, then the body (in one write when small; else in pieces, never copied). What aiohttp's
    Response would send, without building and serializing a header multidict for each
    request."""

    def __init__(
        self,
        request: web.BaseRequest,
        entry: CachedResponse,
        head: bytes,
        cache_status: str,
        age: int | None,
    ) -> None:
        super().__init__(status=entry.status)
        self._keep = request.keep_alive
        tail = f"Cache-Status: {cache_status}\r\n"
        if age is not None:
            tail += f"Age: {age}\r\n"
        self._head = head + tail.encode()
        self._body_bytes = b"" if request.method == "HEAD" else entry.body
        self._sent = False

    @property
    def keep_alive(self) -> bool:
        return self._keep

    def force_close(self) -> None:
        self._keep = False  # before prepare(): the head then says Connection: close

    @property
    def prepared(self) -> bool:
        return self._sent

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if not self._sent:
            self._sent = True
            close = b"" if self._keep else b"Connection: close\r\n"
            body, writer = self._body_bytes, request.writer
            if len(body) <= CHUNK:  # the common case: one small copy, one write
                await writer.write_eof(b"".join((self._head, close, b"\r\n", body)))
            else:
                await writer.write(b"".join((self._head, close, b"\r\n")))
                await write_pieces(writer.write, pieces(body))
                await writer.write_eof()
        return request.writer

    async def write_eof(self, data: bytes = b"") -> None:
        return None


_NOT_MODIFIED_KEEP = NOT_MODIFIED_FIELDS | {"age", "cache-status"}


_PRECONDITIONS = ("If-None-Match", "If-Modified-Since", "If-Match", "If-Unmodified-Since")


def _conditional(request: web.BaseRequest, entry: CachedResponse) -> int:
    """200, 304 or 412 for this request's preconditions against the entry."""
    headers = request.headers
    if not any(name in headers for name in _PRECONDITIONS):  # the common case: no work
        return 200
    if request.method not in ("GET", "HEAD"):
        return 200
    modified = entry.header("Last-Modified") or entry.header("Date")
    return precondition(headers, entry.header("ETag"), modified)


def private_response(
    request: web.BaseRequest, resp: aiohttp.ClientResponse, body: bytes, detail: str
) -> web.StreamResponse:
    """This client's own response, relayed as received (Set-Cookie included)."""
    headers = [*end_to_end(resp.headers), ("Cache-Status", f"{NAME}; {detail}")]
    inflated = measure(body) if is_gzip(headers) and _refuses_gzip(request) else _AS_STORED
    return _for_client(request, resp.status, headers, body, inflated)


async def _body(
    resp: aiohttp.ClientResponse, prefix: list[bytes], inflater: Any
) -> AsyncGenerator[bytes, None]:
    """An upstream body as the client gets it; a break in it (or in its gzip) is BodyBroke.
    Only reading is inside the try: the caller's writes to the client never raise in here."""
    try:
        for chunk in prefix:
            for piece in _inflating(inflater, chunk):
                yield piece
        async for chunk in resp.content.iter_chunked(CHUNK):
            for piece in _inflating(inflater, chunk):
                yield piece
        if inflater is not None:
            yield inflater.flush()
    except (aiohttp.ClientError, TimeoutError, zlib.error) as e:
        # Headers are gone, so no error status can follow: abort the connection so
        # the client sees a truncated response rather than a short one that looks whole.
        raise BodyBroke(f"upstream response broke mid-body: {e!r}") from e


def _inflating(inflater: Any, chunk: bytes) -> Iterable[bytes]:
    """A chunk as the client gets it: inflated at most CHUNK at a time (one 64 KiB chunk of a
    gzip bomb is 64 MB), so the writer's backpressure applies between pieces."""
    if inflater is None:
        yield chunk
        return
    if inflater.eof:  # what follows the gzip stream is dropped, not kept in unused_data
        return
    piece = inflater.decompress(chunk, CHUNK)
    while piece:
        yield piece
        if inflater.eof:
            return
        piece = inflater.decompress(inflater.unconsumed_tail, CHUNK)


async def relay(
    request: web.BaseRequest,
    resp: aiohttp.ClientResponse,
    prefix: list[bytes],
    detail: str,
    inflate: bool,
    close: bool = False,
) -> web.StreamResponse:
    """Stream an upstream response to the client without storing it.

    `inflate`: we asked the upstream for gzip on the client's behalf, so a gzip answer is
    inflated on the fly for a client that did not ask for it. `close`: say Connection: close
    (the proxy is shutting down).
    """
    refuse_transfer_codings(resp)
    headers = [*end_to_end(resp.headers), ("Cache-Status", f"{NAME}; {detail}")]
    inflater = None
    if inflate and is_gzip(headers) and _refuses_gzip(request):
        inflater = zlib.decompressobj(GZIP_WBITS)
        headers = _without(headers, "Content-Encoding")
    out = web.StreamResponse(status=resp.status, headers=headers)
    if resp.content_length is not None and inflater is None:
        out.content_length = resp.content_length
    if close:
        out.force_close()
    await out.prepare(request)
    if request.method == "HEAD":
        await out.write_eof()  # a body after HEAD would be read as the next response
        return out
    try:
        async with contextlib.aclosing(_body(resp, prefix, inflater)) as body:
            async for data in body:
                await out.write(data)
    except aiohttp.ClientError as e:
        # Writing to the client failed (it went away): not the upstream's failure, so not a
        # ClientError, which request() would count against the upstream.
        raise ConnectionResetError(f"client went away mid-body: {e!r}") from e
    await out.write_eof()
    return out
