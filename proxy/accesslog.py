"""One structured (JSON) access-log line per request, when server.access_log is on.

Never secrets: the path without its query (a client's credentials may ride in it), the route
name, and a hash of the cache key instead of the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from contextvars import ContextVar

from aiohttp import web

log = logging.getLogger("cacheproxy.access")
# Seconds the upstream took to answer, for the request being handled (headers received).
UPSTREAM_SECONDS: ContextVar[list[float] | None] = ContextVar("upstream_seconds", default=None)
KEY = web.RequestKey("cacheproxy_key", str)  # the cached path leaves the request's key here


def record_upstream(seconds: float) -> None:
    """Called by the upstream pool: add one call's time to the current request's total."""
    if (times := UPSTREAM_SECONDS.get()) is not None:
        times.append(seconds)


def line(
    method: str,
    path: str,
    route: str,
    outcome: str,
    status: int,
    seconds: float,
    upstream: list[float],
    key: str | None,
) -> str:
    """The JSON access-log line for one answered request."""
    return json.dumps(
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
            "method": method,
            "path": path,
            "route": route,
            "outcome": outcome,
            "status": status,
            "latency_ms": round(seconds * 1000, 3),
            "upstream_ms": round(sum(upstream) * 1000, 3) if upstream else None,
            "key_hash": hashlib.sha256(key.encode()).hexdigest()[:16] if key else None,
        },
        separators=(",", ":"),
    )


def configure() -> None:
    """Access lines go to stdout as bare JSON, apart from the diagnostic log."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
        log.setLevel(logging.INFO)
