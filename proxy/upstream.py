"""One aiohttp ClientSession per upstream, with timeouts; errors mapped to UpstreamError."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.config import Upstream
from proxy.errors import UpstreamError
from proxy.metrics import Metrics

# RFC 9110 7.6.1: connection-specific fields a proxy must not forward. Content-Length is
# re-computed for every message we send, so it never travels through either.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade", "content-length",
})  # fmt: skip


def end_to_end(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> list[tuple[str, str]]:
    """Headers minus hop-by-hop ones, including any the Connection header names."""
    named = {
        token.strip().lower()
        for value in headers.getall("Connection", ())
        for token in value.split(",")
    }
    return [
        (name, value)
        for name, value in headers.items()
        if name.lower() not in HOP_BY_HOP and name.lower() not in named
    ]


class UpstreamPool:
    """Sessions for every configured upstream, opened and closed with the app."""

    def __init__(self, upstreams: Mapping[str, Upstream], metrics: Metrics) -> None:
        self.upstreams = dict(upstreams)
        self.metrics = metrics
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    async def start(self) -> None:
        """Open one session per upstream."""
        for name, upstream in self.upstreams.items():
            self._sessions[name] = self._open(upstream)

    def _open(self, upstream: Upstream) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=upstream.max_connections, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(
                total=upstream.timeout, sock_connect=upstream.connect_timeout
            ),
            auto_decompress=False,  # store and relay bytes exactly as the upstream sent them
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            cookie_jar=aiohttp.DummyCookieJar(),  # never carry one client's cookies to another
        )

    async def close(self) -> None:
        """Close every session."""
        sessions, self._sessions = self._sessions, {}
        await asyncio.gather(*(s.close() for s in sessions.values()))

    @asynccontextmanager
    async def request(
        self,
        upstream_name: str,
        method: str,
        target: str,
        headers: Mapping[str, str],
        data: Any = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send one request; yields the response with its body unread.

        Timeouts become UpstreamError("timeout"), refused or failed connections
        UpstreamError("connect"), broken responses UpstreamError("protocol").
        """
        upstream = self.upstreams[upstream_name]
        url = URL(str(upstream.url).rstrip("/") + target, encoded=True)
        sent = dict(headers)
        sent.update(upstream.headers)  # configured headers always win
        started = time.perf_counter()
        answered = False
        try:
            async with self._sessions[upstream_name].request(
                method, url, headers=sent, data=data, allow_redirects=False
            ) as response:
                self.metrics.upstream_call(
                    upstream_name, response.status, time.perf_counter() - started
                )
                answered = True
                yield response
        except TimeoutError as e:
            self.metrics.upstream_error(upstream_name, "timeout", answered)
            raise UpstreamError("timeout", f"upstream {upstream_name} timed out") from e
        except aiohttp.ClientConnectorError as e:
            self.metrics.upstream_error(upstream_name, "connect", answered)
            raise UpstreamError("connect", f"cannot connect to upstream {upstream_name}") from e
        except (aiohttp.ClientError, ValueError) as e:
            self.metrics.upstream_error(upstream_name, "protocol", answered)
            raise UpstreamError(
                "protocol", f"upstream {upstream_name} sent a broken response"
            ) from e
