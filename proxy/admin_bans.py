"""GET /bans and DELETE /bans/{tag}: the purges on record (tag, route and URL bans, and the
floors), and lifting one on every instance."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.deps import DEPS
from proxy.respond import json_error

_MAX_BANS_PAGE = 1000


async def list_bans(request: web.Request) -> web.Response:
    """The bans this instance holds, by tag, a page at a time (`limit`, `after`)."""
    query = request.query
    try:
        limit = int(query.get("limit", "100"))
    except ValueError:
        return json_error(400, "bad_request", "limit must be an integer")
    if not 1 <= limit <= _MAX_BANS_PAGE:
        return json_error(400, "bad_request", f"limit must be between 1 and {_MAX_BANS_PAGE}")
    bans = request.app[DEPS].store.bans
    items, after = bans.listing(query.get("after", ""), limit)
    return web.json_response({"bans": items, "total": len(bans), "next_after": after})


async def lift_ban(request: web.Request) -> web.Response:
    """Lift one ban here, in Redis, and on the other instances (over the backplane)."""
    store = request.app[DEPS].store
    tag = request.match_info["tag"]
    lifted, reached = await store.banning.lift(tag)
    answer: dict[str, Any] = {"lifted": lifted, "tag": tag, "l2": reached}
    if store.shared.reaches_others and not reached:
        answer["error"] = "l2_unavailable"
        answer["detail"] = "Redis could not be reached: retry when it is back"
        return web.json_response(answer, status=503)
    return web.json_response(answer, status=200 if lifted or reached else 404)


def add_routes(app: web.Application) -> None:
    """Route /bans on the admin app."""
    app.router.add_get("/bans", list_bans)
    app.router.add_delete("/bans/{tag:.+}", lift_ban)
