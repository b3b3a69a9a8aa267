"""Client responses: what the cached path answered with, rendered with what happened (render);
entries, relayed upstream responses, and errors (the one place errors become HTTP). Each
says what happened in Cache-Status (RFC 9211), as its Outcome spells it."""

from __future__ import annotations

import contextlib
import logging
import math
import zlib
from collections.abc import AsyncGenerator, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, assert_never

import aiohttp
from aiohttp import HttpVersion11, web
from aiohttp.abc import AbstractStreamWriter

from proxy.bodies import CHUNK, GZIP_WBITS, BodyResponse, Inflated, measure, pieces, write_pieces
from proxy.bodies import MAX_INFLATED as MAX_INFLATED
from proxy.clock import Clock
from proxy.entry import CachedResponse
from proxy.errors import UpstreamError
from proxy.headers import end_to_end, is_gzip
from proxy.origin import NOT_MODIFIED_FIELDS, precondition
from proxy.outcome import Outcome
from proxy.policy import current_age
from proxy.upstream import BodyBroke, refuse_transfer_codings

log = logging.getLogger(__name__)

Headers = list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Relayed:
    """An upstream response to stream to the client as it arrives, never stored. `exchange`
    holds the upstream request open until the body is through (render closes it)."""

    response: aiohttp.ClientResponse
    prefix: list[bytes]  # what was read of the body already
    inflate: bool  # gzip was asked for on the client's behalf: inflate it if it refuses gzip
    exchange: AsyncExitStack | None


@dataclass(frozen=True, slots=True)
class Unshared:
    """One client's own response, relayed as received (Set-Cookie included), never stored
    nor handed to another request."""

    status: int
    headers: Headers  # end to end
    body: bytes


# What the cached path answers with: an entry (stored or not), an upstream failure, a
# response to relay, or one client's own response.
Answer = CachedResponse | UpstreamError | Relayed | Unshared


async def render(
    request: web.BaseRequest, outcome: Outcome, answer: Answer, clock: Clock, close: bool
) -> web.StreamResponse:
    """The client response for what the cache did (`outcome`) and what it answers with: the
    one place the cached path's answers become HTTP. `close`: say Connection: close (the
    proxy is shutting down)."""
    status = outcome.cache_status
    if isinstance(answer, CachedResponse):
        if outcome.from_cache:  # RFC 9111 4.2.3: what it had, plus our residence time
            age: int | None = current_age(answer.initial_age, answer.stored_at, clock())
        else:  # RFC 9111 5.1: from the origin just now, so only the Age it reported
            age = int(answer.initial_age) if answer.initial_age else None
        return serve_entry(request, answer, status, age)
    if isinstance(answer, UpstreamError):
        return upstream_error(answer, status)
    if isinstance(answer, Relayed):
        async with answer.exchange or contextlib.nullcontext():
            return await relay(request, answer.response, answer.prefix, status,
                               answer.inflate, close)  # fmt: skip
    if isinstance(answer, Unshared):
        return private_response(request, answer, status)
    assert_never(answer)


def json_error(
    status: int, error: str, detail: str, cache_status: str | None = None
) -> web.Response:
    """A short JSON error body: `{"error": "no_route", "detail": "..."}`."""
    headers = {"Cache-Status": cache_status} if cache_status else None
    return web.json_response({"error": error, "detail": detail}, status=status, headers=headers)


def upstream_error(error: UpstreamError, cache_status: str) -> web.Response:
    """The client response for an upstream failure with nothing stale to stand in."""
    response = json_error(error.status, f"upstream_{error.kind}", str(error), cache_status)
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
    wire = entry.wire()
    inflated = _AS_STORED
    if wire.gzip and _refuses_gzip(request):
        inflated = entry.inflated()
    if wire.head is not None and request.version == HttpVersion11 and inflated.size is None:
        return WireResponse(request, entry, wire.head, cache_status, age)
    headers = _with_status(entry, cache_status, age)
    return _for_client(request, entry.status, headers, entry.body, inflated)


def _with_status(entry: CachedResponse, cache_status: str, age: int | None) -> Headers:
    headers = [*entry.headers, ("Cache-Status", cache_status)]
    if age is not None:
        headers.append(("Age", str(age)))
    return headers


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
    request: web.BaseRequest, answer: Unshared, cache_status: str
) -> web.StreamResponse:
    """This client's own response, relayed as received (Set-Cookie included)."""
    headers = [*answer.headers, ("Cache-Status", cache_status)]
    body = answer.body
    inflated = measure(body) if is_gzip(headers) and _refuses_gzip(request) else _AS_STORED
    return _for_client(request, answer.status, headers, body, inflated)


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
    cache_status: str,
    inflate: bool,
    close: bool = False,
) -> web.StreamResponse:
    """Stream an upstream response to the client without storing it.

    `inflate`: we asked the upstream for gzip on the client's behalf, so a gzip answer is
    inflated on the fly for a client that did not ask for it. `close`: say Connection: close
    (the proxy is shutting down).
    """
    refuse_transfer_codings(resp)
    headers = [*end_to_end(resp.headers), ("Cache-Status", cache_status)]
    inflater = None
    if inflate and is_gzip(headers) and _refuses_gzip(request):
        inflater = zlib.decompressobj(GZIP_WBITS)
        headers = _without(headers, "Content-Encoding")
    out = web.StreamResponse(status=resp.status, headers=headers)
    if resp.content_length is not None and inflater is None:
        out.content_length = resp.content_length
    if close:
        out.force_close()
    try:
        await out.prepare(request)
        if request.method != "HEAD":  # a body after HEAD would be read as the next response
            async with contextlib.aclosing(_body(resp, prefix, inflater)) as body:
                async for data in body:
                    await out.write(data)
        await out.write_eof()
    except aiohttp.ClientError as e:
        # Writing to the client failed (it went away; reading the upstream fails as BodyBroke
        # instead): not the upstream's failure, so not a ClientError, which request() would
        # count against the upstream and turn into an error response no one can receive.
        raise ConnectionResetError(f"client went away mid-response: {e!r}") from e
    return out
