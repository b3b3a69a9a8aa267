"""A hit's status line and headers as bytes, serialized once per entry and reused by every
later hit (respond.WireResponse writes them). Below entry.py and respond.py alike: it knows
headers, not entries."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Final

from proxy.headers import HOP_BY_HOP, LINE_BREAK, is_gzip

# RFC 9110 6.4.1 and 8.6: these never carry content, so no Content-Length either.
_NO_CONTENT: Final = frozenset({204, 304})


@dataclass(frozen=True, slots=True)
class Wire:
    """An entry's status line and headers as bytes, made once and reused by every hit."""

    head: bytes | None  # up to and including Content-Length; None: serve through aiohttp
    gzip: bool  # the body is gzip, so clients that refuse gzip may get it inflated


def serialize(
    status: int, headers: Sequence[tuple[str, str]], body_length: int, received_at: float
) -> Wire:
    """What aiohttp would write as the head of a response with these fields, or a Wire
    without a head when only aiohttp may write it (framing fields, line breaks, no content)."""
    head = None
    names = {name.lower() for name, _ in headers}
    lines = [f"{n}: {v}\r\n" for n, v in headers]
    if (
        status >= 200
        and status not in _NO_CONTENT
        and not names & HOP_BY_HOP  # framing is ours to write, never a stored field's
        and not any(LINE_BREAK.search(line, 0, len(line) - 2) for line in lines)
    ):  # a header that could split the response stays with aiohttp, which refuses it
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        if "content-type" not in names and body_length:  # as aiohttp adds (RFC 9110 8.3)
            lines.append("Content-Type: application/octet-stream\r\n")
        if "date" not in names:  # RFC 9110 6.6.1: the time the response was received
            lines.append(f"Date: {formatdate(received_at, usegmt=True)}\r\n")
        lines.append(f"Content-Length: {body_length}\r\n")
        text = f"HTTP/1.1 {status} {reason}\r\n" + "".join(lines)
        with contextlib.suppress(UnicodeEncodeError):
            head = text.encode("utf-8", "surrogateescape")
    return Wire(head, "content-encoding" in names and is_gzip(headers))
