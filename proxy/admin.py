"""make_admin_app(deps): stats, health, keys, ttl, purge, clear, metrics (JSON on its own port)."""

from __future__ import annotations

from importlib import resources
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy import admin_bans
from proxy.adminauth import admin_guard
from proxy.bans import valid_tag
from proxy.deps import DEPS, Deps
from proxy.errors import BadRequest, StoreUnavailable
from proxy.keys import MAX_KEY_TEXT, CacheKey, parse_target
from proxy.listing import page
from proxy.openapi import document
from proxy.reload import reload
from proxy.respond import json_error

_MAX_KEYS = 1000


def _deps(request: web.Request) -> Deps:
    return request.app[DEPS]


def _bad(detail: str) -> web.Response:
    return json_error(400, "bad_request", detail)


async def stats(request: web.Request) -> web.Response:
    """Hit ratio overall and per route, requests, upstream calls, calls saved, per layer."""
    deps = _deps(request)
    body: dict[str, Any] = deps.metrics.summary()
    body["layers"] = _layers(deps)
    return web.json_response(body)


def _layers(deps: Deps) -> dict[str, Any]:
    store = deps.store
    layers: dict[str, Any] = {}
    if store.l1 is not None:
        l1 = store.l1
        layers["l1"] = {
            "entries": len(l1),
            "bytes": l1.bytes,
            "max_entries": l1.max_entries,
            "max_bytes": l1.max_bytes,
            **vars_of(l1.stats),
        }
    for tier in store.remotes:
        layers[tier.name] = {
            **vars_of(tier.stats),
            "breaker": tier.breaker.state,
            "breaker_reason": tier.breaker.reason,
            "backplane": _backplane(deps),
        }
    return layers


def _backplane(deps: Deps) -> dict[str, Any]:
    bp = deps.backplane
    if bp is None:
        return {"connected": False}
    return {"connected": bp.connected, "received": bp.received, "reconnects": bp.reconnects}


def _upstream_health(deps: Deps, name: str, url: str) -> dict[str, Any]:
    guard = deps.upstreams.guard(name)
    body = {"url": url, "breaker": guard.breaker.state, "paused_for": round(guard.paused_for(), 1)}
    if (standing := guard.standing()) is not None:  # a quota shared by the fleet
        body["quota"] = {"shared": standing.shared, "share": standing.share}
    return body


def vars_of(obj: object) -> dict[str, Any]:
    """A slotted dataclass's fields as a dict."""
    return {name: getattr(obj, name) for name in getattr(obj, "__slots__", ())}


async def health(request: web.Request) -> web.Response:
    """Liveness and the state of each part: `ok`, or `degraded` with the reason (still 200:
    a proxy without its L2 keeps serving from L1 and upstream)."""
    deps = _deps(request)
    status, reason = deps.store.health()
    if status == "ok" and deps.backplane is not None and not deps.backplane.connected:
        status, reason = "degraded", "backplane not subscribed: purges from other instances miss"
    alone = [(name, s.share) for name, s in deps.upstreams.quota_standing() if not s.shared]
    if status == "ok" and alone:
        spends = ", ".join(f"{name} ({share})" for name, share in alone)
        status, reason = "degraded", f"Redis unreachable: quotas counted alone, in shares: {spends}"
    body: dict[str, Any] = {"status": status, "instance": deps.instance}
    if deps.fleet is not None:
        body["instances"] = deps.fleet.live()
    if reason:
        body["reason"] = reason
    l1 = deps.store.l1
    if l1 is not None:
        body["l1"] = {"status": "ok", "entries": len(l1), "bytes": l1.bytes}
    for tier in deps.store.remotes:
        body[tier.name] = {
            "status": "ok" if status == "ok" else "unavailable",
            "breaker": tier.breaker.state,
            "backplane": _backplane(deps),
        }
    body["upstreams"] = {
        name: _upstream_health(deps, name, str(u.url)) for name, u in deps.config.upstreams.items()
    }
    body["in_flight"] = len(deps.coalescer)
    return web.json_response(body)


async def keys(request: web.Request) -> web.Response:
    """Cached keys page by page: `pattern` (a glob over path?query), `route`, `limit`,
    `cursor` (from the previous page's `next_cursor`). Secrets in keys are already hashes."""
    deps = _deps(request)
    query = request.query
    pattern = query.get("pattern", "*")
    if not pattern.startswith("/") and pattern != "*":
        return _bad("pattern must start with / (or be *)")
    try:
        limit = int(query.get("limit", "100"))
    except ValueError:
        return _bad("limit must be an integer")
    if not 1 <= limit <= _MAX_KEYS:
        return _bad(f"limit must be between 1 and {_MAX_KEYS}")
    try:
        glob = CacheKey.url_glob(pattern)
    except ValueError as e:
        return _bad(f"pattern: {e}")
    try:
        listed, next_cursor = await page(
            deps.store, glob, query.get("route"), query.get("cursor"), limit
        )
    except ValueError as e:
        return _bad(f"cursor: {e}")
    except StoreUnavailable:
        return json_error(503, "l2_unavailable", "Redis could not be reached for this page")
    now = deps.clock()
    items = [
        {
            "key": item.key,
            "url": _url(item.key),
            "route": item.entry.route,
            "status": item.entry.status,
            "layers": list(item.layers),
            "size": item.entry.size,
            "ttl_left": round(item.entry.expires_at - now, 3),
            "tags": list(item.entry.tags),
        }
        for item in listed
    ]
    return web.json_response(
        {"keys": items, "count": len(items), "limit": limit, "next_cursor": next_cursor}
    )


def _url(key: str) -> str:
    try:
        return CacheKey.parse(key).url
    except ValueError:  # not a key this proxy wrote (Redis is shared)
        return ""


async def ttl(request: web.Request) -> web.Response:
    """TTL classes and routes as loaded."""
    config = _deps(request).config
    return web.json_response({
        "ttl_classes": {
            name: {"ttl": c.ttl, "negative_ttl": c.negative_ttl}
            for name, c in config.ttl_classes.items()
        },
        "routes": [
            {
                "name": r.name,
                "path": r.template,
                "methods": sorted(r.methods),
                "query": {name: sorted(values) for name, values in r.query},
                "upstream": r.upstream,
                "ttl_class": r.ttl_class.name if r.ttl_class else None,
                "pass": r.ttl_class is None,
            }
            for r in config.routes
        ],
    })  # fmt: skip


_PURGE_KINDS = ("url", "pattern", "key", "tag", "route")
_PURGE_HELP = (
    'body must have exactly one of "url", "pattern", "key", "tag" or "route", e.g. '
    '{"url": "/path?q"}, {"pattern": "/v8/*"}, {"tag": "symbol=AAPL", "soft": true}'
)


async def purge(request: web.Request) -> web.Response:
    """Purge by exact URL, cache key, glob over URLs, tag (symbol=AAPL) or route name;
    `"soft": true` (tag and route) keeps entries for stale-if-error."""
    deps = _deps(request)
    try:
        body = await request.json()
    except (ValueError, RecursionError):
        return _bad(_PURGE_HELP)
    if not isinstance(body, dict):
        return _bad(_PURGE_HELP)
    kinds = [k for k in _PURGE_KINDS if k in body]
    unknown = set(body) - {*_PURGE_KINDS, "soft"}
    if len(kinds) != 1 or unknown:
        return _bad(_PURGE_HELP)
    kind = kinds[0]
    value, soft = body[kind], body.get("soft", False)
    if not isinstance(soft, bool) or (soft and kind not in ("tag", "route")):
        return _bad('"soft" is true or false, and only for "tag" and "route" purges')
    if not isinstance(value, str) or not value:
        return _bad(f"{kind} must be a non-empty string")
    if kind in ("tag", "route"):
        return await _purge_tag(deps, kind, value, soft)
    if kind in ("url", "pattern") and not value.startswith("/"):
        return _bad(f"{kind} must start with /")
    if kind == "pattern":
        try:
            counts = await deps.store.purge(CacheKey.url_glob(value))
        except ValueError as e:
            return _bad(f"pattern: {e}")
    elif kind == "key":
        try:
            key = CacheKey.parse(value).text
        except ValueError as e:
            # Not a key this version writes, but one Redis may hold (another version wrote
            # it, or anyone with access): purged by its exact text, as /keys lists it. A URL
            # or a control character is a mistake, said as one.
            if value.startswith("/") or len(value) > MAX_KEY_TEXT or not value.isprintable():
                return _bad(f"key: {e}")
            key = value
        counts = await deps.store.purge_key(key)
    else:
        try:
            counts = await _purge_url(deps, value)
        except BadRequest as e:
            return _bad(str(e))
    return _purged(deps, kind, value, counts)


async def delete_keys(request: web.Request) -> web.Response:
    """DELETE /keys/{pattern}: purge the keys whose URL matches the glob."""
    deps = _deps(request)
    pattern = "/" + request.match_info["pattern"]
    try:
        glob = CacheKey.url_glob(pattern)
    except ValueError as e:
        return _bad(f"pattern: {e}")
    return _purged(deps, "pattern", pattern, await deps.store.purge(glob))


async def _purge_tag(deps: Deps, kind: str, value: str, soft: bool) -> web.Response:
    tag = f"route={value}" if kind == "route" else unquote(value)  # tags hold decoded values
    if not valid_tag(tag):
        return _bad("tag must look like name=value, e.g. symbol=AAPL")
    if kind == "route" and value not in {r.name for r in deps.config.routes}:
        return _bad(f"no route named {value!r}")
    applied, reached = await deps.store.banning.tag(tag, soft)
    label = f"{kind}-soft" if soft else kind
    deps.metrics.purges.labels(label).inc()
    deps.metrics.purged_entries.labels(label).inc(applied)
    answer: dict[str, Any] = {
        "purged": applied, "layers": {"l1": applied}, kind: value, "soft": soft,
        # L2 entries are purged lazily: each one is dropped (or marked) when next looked up.
        "l2": "lazy" if reached else None,
    }  # fmt: skip
    if deps.store.shared.reaches_others and not reached:
        answer["error"] = "l2_unavailable"
        answer["detail"] = "Redis could not be reached: retry the purge when it is back"
        return web.json_response(answer, status=503)
    return web.json_response(answer)


def _purged(deps: Deps, kind: str, value: str, counts: dict[str, int | None]) -> web.Response:
    purged = max((n for n in counts.values() if n is not None), default=0)
    deps.metrics.purges.labels(kind).inc()
    deps.metrics.purged_entries.labels(kind).inc(purged)
    answer: dict[str, Any] = {"purged": purged, "layers": counts, kind: value}
    if None in counts.values():
        # Only this instance's L1 was purged; L2 and the other instances still hold it.
        answer["error"] = "l2_unavailable"
        answer["detail"] = "Redis could not be reached: retry the purge when it is back"
        return web.json_response(answer, status=503)
    return web.json_response(answer)


async def _purge_url(deps: Deps, url: str) -> dict[str, int | None]:
    """Every entry for this URL: all upstreams' routes, and its variants (key-header
    variants, cached POST bodies) by a URL ban: a few commands, never a SCAN."""
    config = deps.config
    target = parse_target(url)
    rules = config.cache.keys
    variants = config.makes_variants()
    totals: dict[str, int | None] = {}
    for upstream in sorted({r.upstream for r in config.routes}):
        exact = CacheKey.of("GET", upstream, target, rules.ignore_params, rules.secret_params)
        _add(totals, await deps.store.purge_key(exact.text))
        banned = not variants or await deps.store.banning.url(exact.resource)
        if not banned and deps.store.shared.reaches_others:
            totals["l2"] = None  # only this instance knows of the variants' ban
    return totals


def _add(totals: dict[str, int | None], counts: dict[str, int | None]) -> None:
    for layer, n in counts.items():
        before = totals.get(layer, 0)
        totals[layer] = None if n is None or before is None else before + n


async def clear(request: web.Request) -> web.Response:
    """Drop every entry, in every layer and every instance."""
    deps = _deps(request)
    cleared = await deps.store.clear()
    deps.metrics.purges.labels("clear").inc()
    deps.metrics.purged_entries.labels("clear").inc(cleared)
    return web.json_response({"cleared": cleared})


async def reload_config(request: web.Request) -> web.Response:
    """Re-read the config file; a bad one gets 400 with its error and changes nothing."""
    result = await reload(_deps(request))
    if not result.ok:
        return json_error(400, "config_rejected", result.error)
    return web.json_response(
        {"reloaded": True, "routes": result.routes, "restart_needed": result.restart_needed}
    )


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of the app's registry."""
    output = generate_latest(_deps(request).metrics.registry)
    return web.Response(body=output, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def dashboard(request: web.Request) -> web.Response:
    """The dashboard: one self-contained page that polls this API."""
    page = resources.files("proxy").joinpath("dashboard.html").read_bytes()
    return web.Response(body=page, content_type="text/html", charset="utf-8")


async def hottest(request: web.Request) -> web.Response:
    """The most requested keys (L2's counts, or this instance's without an L2)."""
    try:
        limit = int(request.query.get("limit", "10"))
    except ValueError:
        return _bad("limit must be an integer")
    if not 1 <= limit <= _MAX_KEYS:
        return _bad(f"limit must be between 1 and {_MAX_KEYS}")
    rows = await _deps(request).store.popularity.hottest(limit)
    return web.json_response({"keys": [{"key": k, "requests": n} for k, n in rows]})


async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 description of this API."""
    return web.json_response(document())


def make_admin_app(deps: Deps) -> web.Application:
    """The operator-facing application on its own listener."""
    app = web.Application(middlewares=[admin_guard])
    app[DEPS] = deps
    app.router.add_get("/stats", stats)
    app.router.add_get("/health", health)
    app.router.add_get("/keys", keys)
    app.router.add_get("/ttl", ttl)
    app.router.add_post("/purge", purge)
    app.router.add_post("/clear", clear)
    app.router.add_post("/reload", reload_config)
    app.router.add_delete("/keys/{pattern:.*}", delete_keys)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/hottest", hottest)
    app.router.add_get("/", dashboard)
    admin_bans.add_routes(app)
    return app
