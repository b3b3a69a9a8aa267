"""The dashboard in headless Chromium against a live proxy with traffic: the numbers it shows
are the ones /stats gives, and a screenshot comes out."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import CountingUpstream, ProxyFactory, Reply


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    message = "chromium is not installed (apt-get install -y chromium)"
    if os.environ.get("CI"):
        pytest.fail(message)  # in CI the browser test must run
    pytest.skip(message)


async def headless(url: str, profile: Path, *extra: str) -> bytes:
    process = await asyncio.create_subprocess_exec(
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
        "--window-size=1280,1100", *extra, url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode == 0
    return output


def figure(dom: str, element: str) -> str:
    m = re.search(rf'id="{element}" data-value="([^"]*)"', dom)
    assert m, f"#{element} not rendered"
    return m.group(1)


async def test_the_dashboard_shows_what_stats_says(
    make_proxy: ProxyFactory, upstream: CountingUpstream, tmp_path: Path
) -> None:
    proxy = await make_proxy()
    upstream.replies["/quote/DOWN"] = Reply(status=503, body=b"down")
    for url in (
        ["/quote/AAPL"] * 5 + ["/quote/MSFT"] * 2 + ["/v8/finance/chart/AAPL", "/quote/DOWN"]
    ):
        await proxy.client.get(url)
    admin = str(proxy.admin.make_url("/"))
    dom = (await headless(admin, tmp_path / "profile", "--dump-dom")).decode()
    stats = await (await proxy.admin.get("/stats")).json()
    assert 'data-loaded="yes"' in dom
    assert int(figure(dom, "requests")) == stats["requests"] == 9
    assert float(figure(dom, "hit-ratio")) == stats["hit_ratio"]
    assert int(figure(dom, "calls-saved")) == stats["calls_saved"]
    assert int(figure(dom, "upstream-calls")) == stats["upstream_calls_total"]
    for route in stats["routes"]:
        assert f'data-route="{route}"' in dom
    assert "GET api /quote/AAPL" in dom  # the hottest key is listed
    assert 'class="badge ok"' in dom

    shot = tmp_path / "dashboard.png"
    await headless(admin, tmp_path / "profile2", f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if target := os.environ.get("CACHEPROXY_SCREENSHOT"):  # docs/dashboard.png, on request
        shutil.copyfile(shot, target)
