"""The OpenAPI document and the admin app agree: same operations, and every response a live
app gives validates against the documented schema for its status."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import CountingUpstream, Proxy, ProxyFactory
from jsonschema import Draft202012Validator

from proxy.adminauth import needs_token
from proxy.openapi import document
from proxy.serverconfig import ServerConfig

DOC = document()


def schema_for(path: str, method: str, status: int) -> dict[str, Any] | None:
    operation = DOC["paths"][path][method]
    response = operation["responses"].get(str(status))
    assert response is not None, f"{method.upper()} {path} answered {status}, not documented"
    return response.get("content", {}).get("application/json", {}).get("schema")


async def check(proxy: Proxy, method: str, url: str, path: str, **kwargs: Any) -> int:
    response = await proxy.admin.request(method.upper(), url, **kwargs)
    schema = schema_for(path, method, response.status)
    if schema is not None:
        Draft202012Validator(schema).validate(await response.json())
    return response.status


def test_every_schema_is_valid_json_schema() -> None:
    for path, operations in DOC["paths"].items():
        for method, operation in operations.items():
            for response in operation["responses"].values():
                for media in response.get("content", {}).values():
                    if "schema" in media:
                        Draft202012Validator.check_schema(media["schema"])
            assert operation["responses"], (path, method)


async def test_the_app_routes_exactly_the_documented_operations(proxy: Proxy) -> None:
    routed = {
        (route.method.lower(), resource.canonical.replace("{pattern:.*}", "{pattern}"))
        for resource in proxy.admin.app.router.resources()  # type: ignore[union-attr]
        for route in resource
        if route.method != "HEAD"  # aiohttp adds HEAD to every GET
    }
    documented = {(m, p) for p, ops in DOC["paths"].items() for m in ops}
    assert routed == documented


async def test_live_responses_match_the_document(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy()
    for url in ("/quote/AAPL", "/quote/AAPL", "/v8/finance/chart/MSFT", "/nowhere"):
        await proxy.client.get(url)
    for path in ("/stats", "/health", "/keys", "/ttl", "/openapi.json", "/metrics"):
        assert await check(proxy, "get", path, path) == 200
    assert await check(proxy, "get", "/keys?limit=1", "/keys") == 200
    assert await check(proxy, "get", "/keys?limit=0", "/keys") == 400
    assert await check(proxy, "get", "/keys?cursor=nope", "/keys") == 400
    purge = "/purge"
    validator = Draft202012Validator(
        DOC["paths"][purge]["post"]["requestBody"]["content"]["application/json"]["schema"]
    )
    bodies: list[Any] = [
        {"url": "/quote/AAPL"}, {"pattern": "/v8/*"}, {"key": "GET api /quote/X"},
        {"tag": "symbol=AAPL"}, {"route": "quote", "soft": True}, {"tag": "x=1", "soft": False},
        {}, {"url": "quote"}, {"nope": 1}, {"url": "/a", "pattern": "/b"}, [1], "x", None,
        {"soft": True}, {"tag": "novalue"},
    ]  # fmt: skip
    for body in bodies:
        status = await check(proxy, "post", purge, purge, json=body)
        if status == 200:  # what the handler accepts, the schema accepts too
            validator.validate(body)
        assert status in (200, 400)
    assert await check(proxy, "delete", "/keys/quote/*", "/keys/{pattern}") == 200
    assert await check(proxy, "get", "/bans", "/bans") == 200
    assert await check(proxy, "get", "/bans?limit=x", "/bans") == 400
    assert await check(proxy, "delete", "/bans/symbol=AAPL", "/bans/{tag}") == 200
    assert await check(proxy, "delete", "/bans/symbol=NONE", "/bans/{tag}") == 404
    assert await check(proxy, "post", "/clear", "/clear") == 200
    assert await check(proxy, "post", "/reload", "/reload") == 400  # no config file here


async def test_unauthorized_answers_are_documented(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    proxy = await make_proxy(server={"admin_token": "secret"})
    for method, url, path in (
        ("post", "/purge", "/purge"), ("post", "/clear", "/clear"),
        ("post", "/reload", "/reload"), ("delete", "/keys/x", "/keys/{pattern}"),
        ("get", "/stats", "/stats"), ("get", "/keys", "/keys"), ("get", "/ttl", "/ttl"),
        ("get", "/hottest", "/hottest"), ("get", "/openapi.json", "/openapi.json"),
    ):  # fmt: skip
        assert await check(proxy, method, url, path, json={"url": "/x"}) == 401


def test_the_documented_security_is_the_guard_s() -> None:
    token = ServerConfig(admin_token="t")
    strict = ServerConfig(admin_token="t", admin_protect_metrics=True)
    for path, operations in DOC["paths"].items():
        for method, operation in operations.items():
            security = operation.get("security", DOC["security"])
            url = path.replace("{pattern}", "x")
            required = bool(security) and {} not in security
            assert required == needs_token(method.upper(), url, token), (method, path)
            listed = {"bearer": []} in security
            assert listed == needs_token(method.upper(), url, strict), (method, path)
            assert ("401" in operation["responses"]) == listed, (method, path)


async def test_refusals_of_the_guard_are_documented(proxy: Proxy) -> None:
    for path, operations in DOC["paths"].items():
        url = path.replace("{pattern}", "x")
        for method in operations:
            rebound = {"Host": "rebind.attacker.example"}
            assert await check(proxy, method, url, path, headers=rebound) == 421
            if method != "get":
                evil = {"Origin": "http://evil.example"}
                assert await check(proxy, method, url, path, headers=evil) == 403


@pytest.mark.parametrize("path", sorted(DOC["paths"]))
def test_every_operation_says_what_it_does(path: str) -> None:
    for operation in DOC["paths"][path].values():
        assert operation["summary"]
