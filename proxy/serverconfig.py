"""The `server:` section: where the proxy and admin listeners bind, and who may use admin."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from proxy.authority import Authority
from proxy.confnode import Node


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Where the proxy and admin listeners bind."""

    host: str = "0.0.0.0"
    port: int = 8080
    admin_host: str = "127.0.0.1"
    admin_port: int = 8081
    admin_token: str = ""
    # Host names the admin port answers to besides IP literals, localhost and admin_host
    # (DNS rebinding defence): `name` on any port or `name:port`.
    admin_allowed_hosts: frozenset[Authority] = frozenset()
    admin_protect_metrics: bool = False  # with admin_token: /metrics needs it too
    log_level: str = "info"
    coalesce_timeout: float = 15.0
    access_log: bool = False  # one JSON line per request on stdout
    shutdown_grace: float = 10.0  # after SIGTERM, how long requests in flight may finish
    # A client connection must send each request's head within this long of connecting or of
    # its previous response (else it is closed: idle keep-alive, slowloris), and a body the
    # proxy reads within this long of its head (else 408).
    client_timeout: float = 75.0
    # Where the memory backend keeps quota counts across restarts ("": $XDG_STATE_HOME/
    # cacheproxy, i.e. ~/.local/state/cacheproxy; the image sets /var/lib/cacheproxy).
    state_dir: str = ""

    @staticmethod
    def parse(node: Node) -> ServerConfig:
        """The `server:` section; an error names its field."""
        node.mapping(tuple(ServerConfig.__dataclass_fields__))
        level = node.child("log_level").text("info").lower()
        if level not in ("debug", "info", "warning", "error"):
            raise node.child("log_level").error(
                f"expected debug, info, warning or error, got {level!r}"
            )
        server = ServerConfig(
            host=node.child("host").text("0.0.0.0"),
            port=node.child("port").integer(8080),
            admin_host=node.child("admin_host").text("127.0.0.1"),
            admin_port=node.child("admin_port").integer(8081),
            admin_token=node.child("admin_token").text(""),
            admin_allowed_hosts=_hosts(node.child("admin_allowed_hosts")),
            admin_protect_metrics=node.child("admin_protect_metrics").flag(False),
            log_level=level,
            coalesce_timeout=node.child("coalesce_timeout").duration(15.0),
            access_log=node.child("access_log").flag(False),
            shutdown_grace=node.child("shutdown_grace").duration(10.0),
            client_timeout=node.child("client_timeout").duration(75.0),
            state_dir=node.child("state_dir").text(""),
        )
        if server.client_timeout <= 0:
            raise node.child("client_timeout").error("must be more than 0")
        if server.admin_protect_metrics and not server.admin_token:
            raise node.child("admin_protect_metrics").error("protects nothing without admin_token")
        if not server.admin_token and not is_loopback(server.admin_host):
            raise node.child("admin_host").error(
                f"refusing to expose the admin port on {server.admin_host!r} without admin_token"
            )
        for port_field in ("port", "admin_port"):
            if getattr(server, port_field) > 65535:
                raise node.child(port_field).error("must be at most 65535")
        return server


def _hosts(node: Node) -> frozenset[Authority]:
    """A name or a list of `name` / `name:port`; an error names its entry."""
    hosts: set[Authority] = set()
    for i, text in enumerate(node.strings()):
        try:
            hosts.add(Authority.parse(text))
        except ValueError as e:
            raise node.child(i).error(str(e)) from e
    return frozenset(hosts)


def is_loopback(host: str) -> bool:
    """Whether host is a loopback address (or localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname that might resolve anywhere
