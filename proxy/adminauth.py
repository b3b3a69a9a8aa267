"""The admin listener's guard: which Host names it answers to, which Origin may change
things, and which calls need the bearer token.

Against a browser, the guard stops two attacks. DNS rebinding points a name the attacker
owns at this port, so the attacker's page becomes same-origin with it: the Host header then
carries the attacker's name, and only names of this listener are accepted. A cross-site page
can send a POST to loopback without reading the answer: the browser sends Origin with it,
and only this listener's own origin may make changes. The token is what stops everyone
else, browser or not; it travels in a header that no other site can make a browser add.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.authority import Authority
from proxy.deps import DEPS
from proxy.respond import json_error
from proxy.serverconfig import ServerConfig

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_READS = frozenset({"GET", "HEAD"})
# Reads without a token even when one is set: the dashboard page itself (static, no data)
# and the liveness probe. /metrics too, unless server.admin_protect_metrics says otherwise.
OPEN_READS = frozenset({"/", "/health"})
METRICS = "/metrics"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def needs_token(method: str, path: str, server: ServerConfig) -> bool:
    """Whether this call needs `Authorization: Bearer <server.admin_token>`."""
    if not server.admin_token:
        return False
    if method in _READS and path in OPEN_READS:
        return False
    return not (method in _READS and path == METRICS and not server.admin_protect_metrics)


def host_allowed(host: Authority, server: ServerConfig) -> bool:
    """Whether a Host names this listener, on whatever port (a tunnel or a port-forward may
    change the port; a rebinding attacker cannot change the name).

    An IP literal cannot be rebound, so any is accepted (a pod IP, a Service's IP, a NAT'd
    address all reach this listener); `localhost` resolves here only; names are accepted
    when they are server.admin_host or listed in server.admin_allowed_hosts (`name` for any
    port, `name:port` for that one)."""
    if host.is_ip or host.host == "localhost":
        return True
    if host.host == server.admin_host.lower().removesuffix("."):
        return True
    return any(
        a.host == host.host and a.port in (None, host.port) for a in server.admin_allowed_hosts
    )


def same_origin(origin: str, host: Authority, scheme: str) -> bool:
    """Whether a browser's Origin (RFC 6454) is this listener's origin as the browser named it
    in Host: same scheme, host and port. `null` (a sandboxed or file: page) never is."""
    origin_scheme, sep, rest = origin.partition("://")
    if not sep or origin_scheme.lower() not in _DEFAULT_PORTS:
        return False
    try:
        theirs = Authority.parse(rest)
    except ValueError:
        return False
    origin_scheme = origin_scheme.lower()
    return (
        origin_scheme == scheme
        and theirs.host == host.host
        and (theirs.port or _DEFAULT_PORTS[origin_scheme]) == (host.port or _DEFAULT_PORTS[scheme])
    )


def _scheme(request: web.Request) -> str:
    """The scheme the browser used. A TLS-terminating proxy in front says so in
    X-Forwarded-Proto; a cross-site page cannot make a browser send that header (it is not
    CORS-safelisted and this port answers no preflight), so trusting it opens nothing."""
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return forwarded if forwarded in _DEFAULT_PORTS else request.scheme


def _authority(value: str) -> Authority | None:
    try:
        return Authority.parse(value)
    except ValueError:
        return None


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")  # as aiohttp decoded the header


@web.middleware
async def admin_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Host first (a rebound name learns nothing, not even whether a token is set), then
    Origin for changes, then the token."""
    server = request.app[DEPS].config.server  # per request: a reload may change it
    sent = request.headers.get("Host")  # HTTP/1.0 tools may send none; a browser always does
    host = None if sent is None else _authority(sent)
    if sent is not None and (host is None or not host_allowed(host, server)):
        return json_error(
            421, "misdirected",
            f"this admin port does not answer to Host {sent[:200]!r}: use its IP address, "
            "localhost or server.admin_host, or list the name in server.admin_allowed_hosts",
        )  # fmt: skip
    origin = request.headers.get("Origin")
    if (
        request.method in MUTATING
        and origin is not None
        and (host is None or not same_origin(origin, host, _scheme(request)))
    ):
        return json_error(
            403, "forbidden", f"admin changes are not accepted from another origin ({origin[:200]})"
        )
    if needs_token(request.method, request.path, server):
        given = request.headers.get("Authorization", "")
        expected = f"Bearer {server.admin_token}"
        if not hmac.compare_digest(_bytes(given), _bytes(expected)):
            response = json_error(401, "unauthorized", "a valid bearer token is required")
            response.headers["WWW-Authenticate"] = 'Bearer realm="cacheproxy-admin"'
            return response
    return await handler(request)
