"""proxy/cli.py: check-config validates without serving and exits 2 on a bad file; serve
closes what it opened when it cannot listen."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import CountingUpstream, base_config

from proxy import cli
from proxy.cli import EXIT_CONFIG, main
from proxy.config import Config, parse_config
from proxy.deps import Deps

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "proxy.yaml"


@pytest.fixture
def bad_config(tmp_path: Path) -> Path:
    data = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    data["routes"][2]["ttl_class"] = "newz"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def test_check_config_prints_the_routes_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "-c", str(SHIPPED)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith(f"{SHIPPED}: ok (")
    assert "TTL classes" in lines[0]
    header = lines[1].split()
    assert header[:4] == ["#", "ROUTE", "METHODS", "PATH"]
    rows = {line.split()[1]: line for line in lines[2:]}
    assert rows["chart_5d"].split()[:4] == [
        "2",
        "chart_5d",
        "GET,HEAD",
        "/v8/finance/chart/{symbol}",
    ]
    assert "range=1d|5d" in rows["chart_5d"]
    assert rows["chart_5d"].split()[-2:] == ["chart_5d", "5m"]
    assert rows["chart_1mo"].split()[-2:] == ["chart_1mo", "30m"]
    assert rows["chart_3mo_plus"].split()[-2:] == ["chart_3mo_plus", "1h"]
    assert "news" in rows["news_post"] and "POST" in rows["news_post"]
    assert len(lines) - 2 == len(rows)
    assert "invalid" not in err


def test_check_config_with_unknown_ttl_class_exits_2(
    bad_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-config", "-c", str(bad_config)]) == EXIT_CONFIG == 2
    out, err = capsys.readouterr()
    assert "routes[2].ttl_class: unknown class 'newz'" in err
    assert "ROUTE" not in out


def test_check_config_with_missing_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.yaml"
    assert main(["check-config", "-c", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_python_dash_m_check_config_exits_2(bad_config: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "-c", str(bad_config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "routes[2].ttl_class: unknown class 'newz'" in result.stderr


def test_python_dash_m_check_config_ok() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "-c", str(SHIPPED)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "chart_3mo_plus" in result.stdout


async def test_serve_closes_what_it_opened_when_a_listener_cannot_start(
    upstream: CountingUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[aiohttp.ClientSession] = []
    build = cli.build_deps

    def build_deps(config: Config, **kwargs: Any) -> Deps:
        deps = build(config, **kwargs)
        start = deps.upstreams.start

        async def started() -> None:
            await start()
            opened.extend(deps.upstreams._sessions.values())

        deps.upstreams.start = started  # type: ignore[method-assign]
        return deps

    monkeypatch.setattr(cli, "build_deps", build_deps)
    with socket.socket() as taken, socket.socket() as free:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
        free.close()
        server = {"host": "127.0.0.1", "port": port, "admin_port": taken.getsockname()[1]}
        config = parse_config(base_config(upstream.url, server=server), env={})
        with pytest.raises(OSError):
            await cli.serve(config)  # the proxy listens, then the admin port is taken
    assert opened and all(session.closed for session in opened)
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))  # the proxy's listener was closed too
