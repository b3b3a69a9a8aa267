"""The dashboard in headless Chromium against a live proxy with traffic: the numbers it shows
are the ones /stats gives, and a screenshot comes out."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
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


def flags(profile: Path) -> list[str]:
    return [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", "--window-size=1280,1100",
    ]  # fmt: skip


async def headless(url: str, profile: Path, *extra: str) -> bytes:
    process = await asyncio.create_subprocess_exec(
        *flags(profile), "--virtual-time-budget=5000", *extra, url,
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


class Page:
    """One Chromium tab driven over the DevTools protocol, as a user would use it."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        call = next(self.ids)
        await self.ws.send_json({"id": call, "method": method, "params": params})
        while True:  # events arrive in between; the answer carries our id
            message = json.loads((await asyncio.wait_for(self.ws.receive(), 30)).data)
            if message.get("id") == call:
                assert "error" not in message, message
                return dict(message["result"])

    async def evaluate(self, expression: str, strict: bool = True) -> Any:
        answer = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        assert not strict or "exceptionDetails" not in answer, answer
        return answer["result"].get("value")

    async def until(self, expression: str, seconds: float = 30.0) -> None:
        """Wait (bounded) for the page's own loading, polling and rendering to make it true."""
        for _ in range(int(seconds / 0.05)):
            if await self.evaluate(expression, strict=False):  # may run before the page is in
                return
            await asyncio.sleep(0.05)  # waiting for the browser, not for time to pass
        raise AssertionError(f"never true: {expression}")


@asynccontextmanager
async def devtools(url: str, profile: Path) -> AsyncIterator[Page]:
    """Chromium showing url, with a DevTools connection to its tab."""
    process = await asyncio.create_subprocess_exec(
        *flags(profile), "--remote-debugging-port=0", url,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        active = profile / "DevToolsActivePort"
        for _ in range(1500):
            if active.exists() and len(active.read_text().split()) == 2:
                break
            await asyncio.sleep(0.02)  # waiting for the browser to start
        port = int(active.read_text().split()[0])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as listing:
                tab = next(t for t in await listing.json() if t["type"] == "page")
            async with session.ws_connect(tab["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                yield Page(ws)
    finally:
        process.kill()
        await process.wait()


async def test_with_a_token_the_dashboard_asks_for_it_then_shows_the_data(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await make_proxy(server={"admin_token": "s3cret"})
    for url in ["/quote/AAPL"] * 3 + ["/quote/MSFT"]:
        await proxy.client.get(url)
    token = {"Authorization": "Bearer s3cret"}
    async with devtools(str(proxy.admin.make_url("/")), tmp_path / "profile") as page:
        login = "!document.getElementById('login').hidden"
        await page.until(login)  # the API answered 401: the page asks for the token
        assert await page.evaluate("document.body.dataset.loaded") is None
        assert await page.evaluate("document.getElementById('requests').dataset.value") == ""
        submit = "document.getElementById('token').value = {!r}; " \
                 "document.getElementById('login').requestSubmit()"  # fmt: skip
        await page.evaluate(submit.format("wrong"))
        await page.until(f"{login} && document.getElementById('login-error').textContent")
        await page.evaluate(submit.format("s3cret"))
        await page.until("document.body.dataset.loaded === 'yes'")
        stats = await (await proxy.admin.get("/stats", headers=token)).json()
        shown = await page.evaluate("document.getElementById('requests').dataset.value")
        assert int(shown) == stats["requests"] == 4
        assert "GET api /quote/AAPL" in await page.evaluate(
            "document.getElementById('hottest').textContent"
        )
        assert await page.evaluate("sessionStorage.getItem('cacheproxy-admin-token')") == "s3cret"
        assert not await page.evaluate(login)

        # Reloading the tab keeps its token: the data comes back without asking again.
        await page.evaluate("window.before_reload = true")
        await page.send("Page.reload")
        await page.until("!window.before_reload && document.body.dataset.loaded === 'yes'")
        assert not await page.evaluate(login)

        # The purge form sends the same token.
        assert len(proxy.l1) == 2
        await page.evaluate(
            "document.getElementById('purge-value').value = '/quote/AAPL'; "
            "document.getElementById('purge').requestSubmit()"
        )
        await page.until("document.getElementById('purge-result').textContent.startsWith('200')")
        assert len(proxy.l1) == 1
