"""The admin API described as OpenAPI 3.1 (served at GET /openapi.json).

A test calls every documented operation on a live admin app and validates what comes back
against these schemas, and checks that the app routes exactly these operations.
"""

from __future__ import annotations

from typing import Any

from proxy import __version__
from proxy.adminauth import METRICS, MUTATING, OPEN_READS

_INT = {"type": "integer", "minimum": 0}
_COUNT_OR_NULL = {"type": ["integer", "null"], "minimum": 0}
_ERROR = {
    "type": "object",
    "required": ["error", "detail"],
    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
}
_RATIOS = {
    "type": "object",
    "required": ["requests", "outcomes", "cacheable_requests", "calls_saved", "hit_ratio"],
    "properties": {
        "requests": _INT,
        "outcomes": {"type": "object", "additionalProperties": _INT},
        "cacheable_requests": _INT,
        "calls_saved": _INT,
        "hit_ratio": {"type": "number", "minimum": 0, "maximum": 1},
    },
}
_STATS = {
    "allOf": [_RATIOS],
    "type": "object",
    "required": ["upstream_calls", "upstream_calls_total", "routes", "layers"],
    "properties": {
        "upstream_calls": {"type": "object", "additionalProperties": _INT},
        "upstream_calls_total": _INT,
        "routes": {"type": "object", "additionalProperties": _RATIOS},
        "layers": {"type": "object", "additionalProperties": {"type": "object"}},
    },
}
_HEALTH = {
    "type": "object",
    "required": ["status", "instance", "upstreams", "in_flight"],
    "properties": {
        "status": {"enum": ["ok", "degraded"]},
        "reason": {"type": "string"},
        "instance": {"type": "string"},
        "l1": {"type": "object"},
        "l2": {"type": "object"},
        "upstreams": {"type": "object"},
        "in_flight": _INT,
    },
}
_KEY = {
    "type": "object",
    "required": ["key", "url", "route", "status", "layers", "size", "ttl_left", "tags"],
    "properties": {
        "key": {"type": "string"},
        "url": {"type": "string"},
        "route": {"type": "string"},
        "status": {"type": "integer"},
        "layers": {"type": "array", "items": {"enum": ["l1", "l2"]}, "minItems": 1},
        "size": _INT,
        "ttl_left": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
}
_KEYS = {
    "type": "object",
    "required": ["keys", "count", "limit", "next_cursor"],
    "properties": {
        "keys": {"type": "array", "items": _KEY},
        "count": _INT,
        "limit": _INT,
        "next_cursor": {"type": ["string", "null"]},
    },
}
_TTL = {
    "type": "object",
    "required": ["ttl_classes", "routes"],
    "properties": {
        "ttl_classes": {"type": "object", "additionalProperties": {"type": "object"}},
        "routes": {"type": "array", "items": {"type": "object", "required": ["name", "path"]}},
    },
}
_PURGE_REQUEST = {
    "type": "object",
    "minProperties": 1,
    "maxProperties": 2,
    "properties": {
        "url": {"type": "string", "pattern": "^/"},
        "pattern": {"type": "string", "pattern": "^/"},
        "key": {"type": "string", "minLength": 1},
        "tag": {"type": "string", "pattern": ".=."},
        "route": {"type": "string", "minLength": 1},
        "soft": {"type": "boolean"},
    },
    "additionalProperties": False,
}
_PURGED = {
    "type": "object",
    "required": ["purged", "layers"],
    "properties": {
        "purged": _INT,
        "layers": {"type": "object", "additionalProperties": _COUNT_OR_NULL},
        "l2": {"type": ["string", "null"]},
        "soft": {"type": "boolean"},
        "error": {"type": "string"},
        "detail": {"type": "string"},
    },
}
_RELOADED = {
    "type": "object",
    "required": ["reloaded", "routes", "restart_needed"],
    "properties": {
        "reloaded": {"const": True},
        "routes": _INT,
        "restart_needed": {"type": "array", "items": {"type": "string"}},
    },
}
_BANS = {
    "type": "object",
    "required": ["bans", "total", "next_after"],
    "properties": {
        "bans": {"type": "array", "items": {
            "type": "object", "required": ["tag", "hard", "soft"],
            "properties": {"tag": {"type": "string"}, "hard": {"type": ["number", "null"]},
                           "soft": {"type": ["number", "null"]}}}},
        "total": _INT,
        "next_after": {"type": ["string", "null"]},
    },
}  # fmt: skip
_LIFTED = {
    "type": "object",
    "required": ["lifted", "tag", "l2"],
    "properties": {"lifted": {"type": "boolean"}, "tag": {"type": "string"},
                   "l2": {"type": "boolean"}, "error": {"type": "string"},
                   "detail": {"type": "string"}},
}  # fmt: skip

_HOTTEST = {
    "type": "object",
    "required": ["keys"],
    "properties": {"keys": {"type": "array", "items": {
        "type": "object", "required": ["key", "requests"],
        "properties": {"key": {"type": "string"}, "requests": {"type": "number"}}}}},
}  # fmt: skip


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_BAD = _json(_ERROR, "Malformed request; nothing changed")
_UNAUTHORIZED = _json(_ERROR, "Missing or wrong bearer token (when one is configured)")
_L2_DOWN = _json(_PURGED, "Redis unreachable: only this instance's L1 changed")

PATHS: dict[str, dict[str, Any]] = {
    "/stats": {"get": {"summary": "Hit ratio overall, per route and per layer",
                       "responses": {"200": _json(_STATS, "Counters since start")}}},
    "/health": {"get": {"summary": "L1, L2, backplane and upstream state",
                        "responses": {"200": _json(_HEALTH, "ok, or degraded with a reason")}}},
    "/keys": {"get": {
        "summary": "Cached keys, page by page",
        "parameters": [
            {"name": n, "in": "query", "required": False, "schema": s}
            for n, s in (("pattern", {"type": "string"}), ("route", {"type": "string"}),
                         ("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
                         ("cursor", {"type": "string"}))
        ],
        "responses": {"200": _json(_KEYS, "One page"), "400": _BAD}}},
    "/keys/{pattern}": {"delete": {
        "summary": "Purge the keys whose path?query matches the glob",
        "parameters": [{"name": "pattern", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "responses": {"200": _json(_PURGED, "Counts per layer"), "401": _UNAUTHORIZED,
                      "503": _L2_DOWN}}},
    "/ttl": {"get": {"summary": "TTL classes and routes as loaded",
                     "responses": {"200": _json(_TTL, "The running configuration")}}},
    "/purge": {"post": {
        "summary": "Purge by url, key, pattern, tag or route (soft for tag and route)",
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": _PURGE_REQUEST}}},
        "responses": {"200": _json(_PURGED, "Counts per layer"), "400": _BAD,
                      "401": _UNAUTHORIZED, "503": _L2_DOWN}}},
    "/clear": {"post": {"summary": "Drop every entry, in every layer and instance",
                        "responses": {"200": _json({"type": "object", "required": ["cleared"],
                                                    "properties": {"cleared": _INT}}, "Count"),
                                      "401": _UNAUTHORIZED}}},
    "/reload": {"post": {"summary": "Re-read the config file (as SIGHUP does)",
                         "responses": {"200": _json(_RELOADED, "Switched"),
                                       "400": _json(_ERROR, "Rejected; the old config serves"),
                                       "401": _UNAUTHORIZED}}},
    "/metrics": {"get": {"summary": "Prometheus text exposition",
                         "responses": {"200": {"description": "Metrics",
                                               "content": {"text/plain": {}}}}}},
    "/hottest": {"get": {
        "summary": "The most requested keys",
        "parameters": [{"name": "limit", "in": "query", "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}],
        "responses": {"200": _json(_HOTTEST, "Busiest first"), "400": _BAD}}},
    "/bans": {"get": {
        "summary": "Purges on record: tag, route and URL bans (`url upstream path?query`, "
                   "or `url #<sha256 prefix>` past 512 characters, made by unsafe "
                   "requests), and the floors `*` and `url *` that the oldest "
                   "fold into past the bound; times are epoch seconds",
        "parameters": [
            {"name": "limit", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
            {"name": "after", "in": "query", "required": False,
             "schema": {"type": "string"}, "description": "the previous page's next_after"}],
        "responses": {"200": _json(_BANS, "One page, by tag"), "400": _BAD}}},
    "/bans/{tag}": {"delete": {
        "summary": "Lift one ban (or a floor) here, in Redis and on every instance",
        "parameters": [{"name": "tag", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "responses": {"200": _json(_LIFTED, "Lifted (or none here, but Redis got it)"),
                      "401": _UNAUTHORIZED,
                      "404": _json(_LIFTED, "No such ban (memory backend)"),
                      "503": _json(_LIFTED, "Redis unreachable: lifted here only")}}},
    "/": {"get": {"summary": "The dashboard (HTML)",
                  "responses": {"200": {"description": "A self-contained page",
                                        "content": {"text/html": {}}}}}},
    "/openapi.json": {"get": {"summary": "This document",
                              "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")}}},
}  # fmt: skip


_MISDIRECTED = _json(_ERROR, "Host does not name this admin listener (see admin_allowed_hosts)")
_CROSS_ORIGIN = _json(_ERROR, "Origin is another site, or another port or scheme of this one")
_SECURITY = (
    "With server.admin_token set, every operation that lists the bearer scheme needs "
    "`Authorization: Bearer <token>`; GET / and GET /health never do, and GET /metrics only "
    "with server.admin_protect_metrics. Every operation answers 421 when Host is not an IP "
    "address, localhost, server.admin_host or one of server.admin_allowed_hosts."
)


def _guarded(path: str, method: str, operation: dict[str, Any]) -> dict[str, Any]:
    """An operation with what proxy/adminauth.py adds: its security and its refusals."""
    responses = {**operation["responses"], "421": _MISDIRECTED}
    if method.upper() in MUTATING:
        responses["403"] = _CROSS_ORIGIN
    guarded = {**operation, "responses": responses}
    if path in OPEN_READS:
        guarded["security"] = []
    else:
        responses.setdefault("401", _UNAUTHORIZED)
        if path == METRICS:  # open unless server.admin_protect_metrics
            guarded["security"] = [{}, {"bearer": []}]
    return guarded


def document() -> dict[str, Any]:
    """The OpenAPI document for the admin API."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "cacheproxy admin API", "version": __version__,
                 "description": _SECURITY},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            path: {method: _guarded(path, method, op) for method, op in operations.items()}
            for path, operations in PATHS.items()
        },
    }  # fmt: skip
