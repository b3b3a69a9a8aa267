"""proxy/authority.py: Host values and config entries parsed into (host, port)."""

from __future__ import annotations

import pytest

from proxy.authority import Authority


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("localhost", "localhost", None),
        ("LocalHost:8081", "localhost", 8081),
        ("admin.internal.", "admin.internal", None),
        ("127.0.0.1:8081", "127.0.0.1", 8081),
        ("[::1]", "::1", None),
        ("[0:0:0:0:0:0:0:1]:8081", "::1", 8081),
        ("my_host-1.example", "my_host-1.example", None),
    ],
)
def test_parse(text: str, host: str, port: int | None) -> None:
    parsed = Authority.parse(text)
    assert (parsed.host, parsed.port) == (host, port)
    assert Authority.parse(str(parsed)) == parsed


@pytest.mark.parametrize(
    "text",
    ["", ":8081", "a b", "http://a", "a/b", "a@b", "::1", "[::1", "[zz]", "a:0", "a:65536",
     "a:123456", "a..b", ".a", "*.a", "a:", "a" * 256, "a\r\nb", "é.example"],
)  # fmt: skip
def test_parse_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        Authority.parse(text)


def test_is_ip() -> None:
    assert Authority.parse("10.1.2.3").is_ip
    assert Authority.parse("[fe80::1]:80").is_ip
    assert not Authority.parse("localhost").is_ip
    assert not Authority.parse("127.1").is_ip  # not canonical: browsers would send 127.0.0.1
