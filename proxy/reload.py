"""Hot reload: re-read the config file and switch to it without dropping a connection.

Routes, TTL classes, upstreams, markets, key rules, warm-up and the admin token change at
once. The cache's layers and bounds and the listeners cannot change under a running
process: those fields keep their running values and the answer says a restart is needed.
A file that does not load is rejected with its error, and the old config keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace

import aiohttp

from proxy.bans import ban_horizon
from proxy.config import Config, load_config
from proxy.deps import Deps
from proxy.errors import ConfigError
from proxy.serverconfig import is_loopback

log = logging.getLogger(__name__)
RETIRE_AFTER = 60.0  # seconds: replaced upstream sessions finish their requests meanwhile


@dataclass(frozen=True, slots=True)
class Reloaded:
    """What a reload did."""

    ok: bool
    error: str = ""
    restart_needed: list[str] = field(default_factory=list)
    routes: int = 0


def _pinned(running: Config, loaded: Config) -> tuple[Config, list[str]]:
    """The loaded config with the fields a running process cannot change set back to their
    running values, and the names of those that differed."""
    rc, lc, rs, ls = running.cache, loaded.cache, running.server, loaded.server
    pinned = {
        "cache.backend": (rc.backend, lc.backend),
        "cache.l1.max_entries": (rc.l1_max_entries, lc.l1_max_entries),
        "cache.l1.max_memory": (rc.l1_max_bytes, lc.l1_max_bytes),
        "cache.redis": (rc.redis, lc.redis),
        "server.host": (rs.host, ls.host),
        "server.port": (rs.port, ls.port),
        "server.admin_host": (rs.admin_host, ls.admin_host),
        "server.admin_port": (rs.admin_port, ls.admin_port),
        "server.client_timeout": (rs.client_timeout, ls.client_timeout),
    }
    changed = [name for name, (old, new) in pinned.items() if old != new]
    cache = replace(lc, backend=rc.backend, l1_max_entries=rc.l1_max_entries,
                    l1_max_bytes=rc.l1_max_bytes, redis=rc.redis)  # fmt: skip
    server = replace(ls, host=rs.host, port=rs.port, admin_host=rs.admin_host,
                     admin_port=rs.admin_port, client_timeout=rs.client_timeout)  # fmt: skip
    return replace(loaded, cache=cache, server=server), changed


async def reload(deps: Deps) -> Reloaded:
    """Load deps.config_path again and switch to it, or say why not."""
    if deps.config_path is None:
        return Reloaded(False, "the proxy was started without a config file")
    try:
        loaded = load_config(deps.config_path)
    except ConfigError as e:
        log.error("reload rejected, the old config keeps serving: %s", e)
        return Reloaded(False, str(e))
    config, restart_needed = _pinned(deps.config, loaded)
    if not config.server.admin_token and not is_loopback(config.server.admin_host):
        # The listener stays where it is until a restart: it must keep needing a token.
        error = (
            f"server.admin_token: the admin port still listens on {config.server.admin_host!r}"
            " until a restart, so it must keep a token"
        )
        return Reloaded(False, error)
    retired = deps.upstreams.update(config.upstreams)
    old_level = deps.config.server.log_level
    deps.config = config  # handlers read deps.config per request: the switch is atomic
    deps.store.bans.widen(ban_horizon(config.ttl_classes.values()))
    if config.server.log_level != old_level:  # otherwise keep what --log-level set
        logging.getLogger().setLevel(config.server.log_level.upper())
    if retired:
        deps.tasks.spawn(_retire(deps, retired), "retire-upstream-sessions")
    if restart_needed:
        log.warning("reloaded; these need a restart to change: %s", ", ".join(restart_needed))
    log.info("config reloaded: %d routes", len(config.routes))
    return Reloaded(True, restart_needed=restart_needed, routes=len(config.routes))


async def _retire(deps: Deps, sessions: list[aiohttp.ClientSession]) -> None:
    try:
        await asyncio.sleep(RETIRE_AFTER)
    finally:
        deps.upstreams.forget(sessions)
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
