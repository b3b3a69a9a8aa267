"""proxy/adminauth.py's decisions as tables (the middleware runs in test_admin.py, against a
live admin app and a real `cacheproxy serve`)."""

from __future__ import annotations

import pytest

from proxy.adminauth import host_allowed, needs_token, same_origin
from proxy.authority import Authority
from proxy.serverconfig import ServerConfig

SERVER = ServerConfig(
    admin_host="admin.local",
    admin_allowed_hosts=frozenset({Authority("ops.example"), Authority("lb.example", 443)}),
)


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:8081", True), ("[::1]", True), ("10.0.0.7:9999", True),  # IP literals
        ("localhost", True), ("localhost:9000", True),  # a tunnel may change the port
        ("admin.local:8081", True), ("Admin.Local.", True),  # server.admin_host
        ("ops.example", True), ("ops.example:8081", True), ("lb.example:443", True),
        ("lb.example", False), ("lb.example:8081", False),  # listed with a port: that one only
        ("rebind.attacker.example:8081", False), ("localhost.attacker.example", False),
        ("127.0.0.1.nip.io", False), ("evil.localhost", False),
    ],
)  # fmt: skip
def test_host_allowed(host: str, allowed: bool) -> None:
    assert host_allowed(Authority.parse(host), SERVER) is allowed


@pytest.mark.parametrize(
    ("origin", "host", "scheme", "same"),
    [
        ("http://127.0.0.1:8081", "127.0.0.1:8081", "http", True),
        ("http://LOCALHOST:8081", "localhost:8081", "http", True),
        ("http://admin.local", "admin.local", "http", True),
        ("http://admin.local:80", "admin.local", "http", True),
        ("https://lb.example", "lb.example", "https", True),  # behind TLS termination
        ("https://lb.example:443", "lb.example", "https", True),
        ("http://127.0.0.1:8000", "127.0.0.1:8081", "http", False),  # another port
        ("http://127.0.0.1", "127.0.0.1:8081", "http", False),
        ("https://127.0.0.1:8081", "127.0.0.1:8081", "http", False),  # another scheme
        ("http://lb.example", "lb.example", "https", False),
        ("http://evil.example:8081", "127.0.0.1:8081", "http", False),
        ("null", "127.0.0.1:8081", "http", False),
        ("file://", "127.0.0.1:8081", "http", False),
        ("http://127.0.0.1:8081/", "127.0.0.1:8081", "http", False),  # not an origin
        ("ftp://127.0.0.1:8081", "127.0.0.1:8081", "http", False),
    ],
)  # fmt: skip
def test_same_origin(origin: str, host: str, scheme: str, same: bool) -> None:
    assert same_origin(origin, Authority.parse(host), scheme) is same


def test_needs_token() -> None:
    open_ = ServerConfig()
    token = ServerConfig(admin_token="t")
    strict = ServerConfig(admin_token="t", admin_protect_metrics=True)
    for method, path in (("GET", "/stats"), ("POST", "/clear"), ("GET", "/metrics")):
        assert not needs_token(method, path, open_)
    for method, path in (("GET", "/stats"), ("GET", "/keys"), ("HEAD", "/hottest"),
                         ("GET", "/ttl"), ("GET", "/openapi.json"), ("POST", "/purge"),
                         ("DELETE", "/keys/x"), ("GET", "/nowhere"), ("POST", "/health"),
                         ("OPTIONS", "/")):  # fmt: skip
        assert needs_token(method, path, token), (method, path)
    for method, path in (("GET", "/"), ("HEAD", "/health"), ("GET", "/metrics")):
        assert not needs_token(method, path, token), (method, path)
    assert needs_token("GET", "/metrics", strict)
    assert not needs_token("GET", "/health", strict)
