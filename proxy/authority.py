"""Authority: the `host[:port]` of a Host header or a config entry, parsed once (RFC 9110 7.2)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_AUTHORITY = re.compile(
    r"(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9_.-]{1,255}))(?::(?P<port>[0-9]{1,5}))?"
)


@dataclass(frozen=True, slots=True)
class Authority:
    """A host (lower case, no brackets, no trailing dot) and the port, if one was written."""

    host: str
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> Authority:
        """`localhost`, `Admin.Example.:8081`, `10.0.0.7`, `[::1]:8081`; ValueError otherwise."""
        m = _AUTHORITY.fullmatch(text)
        if m is None:
            raise ValueError(f"expected host or host:port (e.g. admin.internal:8081), got {text!r}")
        if ip6 := m["ip6"]:
            try:
                host = ipaddress.IPv6Address(ip6).compressed
            except ValueError as e:
                raise ValueError(f"not an IPv6 address: [{ip6}]") from e
        else:
            host = m["name"].lower().removesuffix(".")
            if not host or ".." in host or host.startswith("."):
                raise ValueError(f"not a host name: {m['name']!r}")
        port = int(m["port"]) if m["port"] else None
        if port is not None and not 0 < port <= 65535:
            raise ValueError(f"port must be between 1 and 65535, got {port}")
        return cls(host, port)

    @property
    def is_ip(self) -> bool:
        """Whether the host is an IP literal rather than a name."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"
