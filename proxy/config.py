"""YAML -> frozen dataclasses. Every error names its place, e.g. routes[3].ttl_class."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from yarl import URL

from proxy.confnode import Node, expand_tree
from proxy.errors import ConfigError
from proxy.market import Market
from proxy.policy import TTLClass
from proxy.quota import QuotaReset, Window, parse_windows
from proxy.quotaheaders import QuotaHeaders
from proxy.routes import Route, RouteTable, compile_template
from proxy.serverconfig import ServerConfig
from proxy.warm import WarmConfig

Backend = Literal["memory", "redis", "layered"]
BACKENDS: tuple[Backend, ...] = ("memory", "redis", "layered")


@dataclass(frozen=True, slots=True)
class Upstream:
    """One external API the proxy may forward to, and what it adds to each call."""

    name: str
    url: URL
    connect_timeout: float = 3.0
    timeout: float = 15.0
    max_connections: int = 100
    # Idle pooled connections close after this (0: none is reused). Shorter than the
    # servers' own idle timeouts (Node and uvicorn 5 s), so we rarely send on one they close.
    idle_timeout: float = 4.0
    headers: Mapping[str, str] = field(default_factory=dict)
    query: Mapping[str, str] = field(default_factory=dict)
    rate_limit: tuple[Window, ...] = ()  # e.g. (8/min, 800/day): every one must have room
    quota_reset: QuotaReset = field(default_factory=QuotaReset)  # when day windows start over
    quota_headers: QuotaHeaders | None = None  # what the upstream says is left of a window
    rate_limit_wait: float = 2.0  # with nothing stale to serve, wait this long for a token
    retries: int = 2  # idempotent requests, on connection errors only
    breaker_failures: int = 5  # consecutive failures that stop calls for a while
    breaker_backoff: float = 1.0
    breaker_max_backoff: float = 60.0


@dataclass(frozen=True, slots=True)
class KeyRules:
    """What goes into a cache key besides method, upstream and path."""

    ignore_params: frozenset[str] = frozenset({"_"})
    headers: tuple[str, ...] = ()
    # Hashed in keys besides the names keys.py recognises (apikey, api_token, sig, ...).
    secret_params: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """The shared L2: where it is, how long to wait for it, and how to back off."""

    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "cacheproxy:"
    command_timeout: float = 0.05  # a slow Redis must not slow the request it serves
    connect_timeout: float = 0.25
    breaker_failures: int = 3  # consecutive failures that open the circuit
    breaker_backoff: float = 0.5  # first probe after this long, doubling ...
    breaker_max_backoff: float = 30.0  # ... up to this
    lease_ttl: float = 10.0  # how long one instance may hold the right to fetch a key
    lease_wait: float = 5.0  # how long other instances wait for that fetch to land in L2
    popularity_flush: float = 1.0  # request counts go to L2 this often (0: not at all)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Which stores hold entries, and their bounds."""

    backend: Backend = "memory"
    l1_max_entries: int = 1000
    l1_max_bytes: int = 100 * 1024 * 1024
    redis: RedisConfig = field(default_factory=RedisConfig)
    max_object_size: int = 8 * 1024 * 1024
    keys: KeyRules = field(default_factory=KeyRules)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration."""

    upstreams: Mapping[str, Upstream]
    ttl_classes: Mapping[str, TTLClass]
    routes: RouteTable
    markets: Mapping[str, Market] = field(default_factory=dict)
    cache: CacheConfig = field(default_factory=CacheConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    warm: WarmConfig = field(default_factory=WarmConfig)

    def makes_variants(self) -> bool:
        """Whether a URL can have several entries (key headers, cached POST bodies), which
        a purge of the URL or an unsafe request to it must reach too."""
        return bool(self.cache.keys.headers) or any(
            r.key_headers or r.cache_post for r in self.routes
        )


def _upstream(name: str, node: Node) -> Upstream:
    node.mapping(tuple(Upstream.__dataclass_fields__.keys() - {"name"}))
    if not name or " " in name or not name.isprintable():  # CacheKey splits at spaces
        raise node.error("an upstream's name goes into cache keys: no spaces, nothing unprintable")
    url_node = node.child("url")
    url = url_node.url()
    if url.scheme not in ("http", "https") or not url.host:
        raise url_node.error(f"expected an absolute http(s) URL, got {url_node.value!r}")
    if url.user or url.password:
        raise url_node.error(
            "must not carry credentials (they would show in logs and /health); "
            "send them with 'headers:' or 'query:' instead"
        )
    if url.query_string or url.fragment:
        raise url_node.error("must not carry a query or fragment (use 'query:' to add parameters)")
    rate_limit = parse_windows(node.child("rate_limit"))
    return Upstream(
        name=name,
        url=url,
        connect_timeout=node.child("connect_timeout").duration(3.0),
        timeout=node.child("timeout").duration(15.0),
        max_connections=node.child("max_connections").integer(100, minimum=1),
        idle_timeout=node.child("idle_timeout").duration(4.0),
        headers=node.child("headers").string_map(),
        query=node.child("query").string_map(),
        rate_limit=rate_limit,
        quota_reset=node.child("quota_reset").convert(QuotaReset.parse, QuotaReset()),
        quota_headers=QuotaHeaders.parse(node.child("quota_headers"), rate_limit),
        rate_limit_wait=node.child("rate_limit_wait").duration(2.0),
        retries=node.child("retries").integer(2),
        breaker_failures=node.child("breaker_failures").integer(5, minimum=1),
        breaker_backoff=node.child("breaker_backoff").duration(1.0),
        breaker_max_backoff=node.child("breaker_max_backoff").duration(60.0),
    )


def _ttl_class(name: str, node: Node, markets: Mapping[str, Market]) -> TTLClass:
    if not isinstance(node.value, dict):  # shorthand: `news: 15m`
        ttl = node.duration(0.0)
        if not node.present():
            raise node.error("is required")
        return TTLClass(name=name, ttl=ttl, negative_ttl=min(ttl, 60.0))
    node.mapping(_CLASS_FIELDS)
    ttl_node = node.child("ttl")
    if not ttl_node.present():
        raise ttl_node.error("is required")
    origin = ttl_node.value == "origin"  # RFC 9111: the upstream's Cache-Control decides
    ttl = 0.0 if origin else ttl_node.duration(0.0)
    ahead_node = node.child("refresh_ahead")
    ahead = ahead_node.fraction(0.0)
    if not 0.0 <= ahead < 1.0:
        raise ahead_node.error(f"must be a fraction of ttl in [0, 1), e.g. 0.8; got {ahead}")
    closed_node = node.child("closed_ttl")
    closed_ttl = closed_node.duration(0.0) if closed_node.present() else None
    market_node = node.child("market")
    market: Market | None = None
    if market_node.present():
        market_name = market_node.text()
        if market_name not in markets:
            raise market_node.error(f"unknown market {market_name!r}")
        market = markets[market_name]
    elif closed_ttl is not None:
        if len(markets) != 1:
            raise market_node.error("is required with closed_ttl (name one of 'markets')")
        market = next(iter(markets.values()))
    return TTLClass(
        name=name,
        ttl=ttl,
        origin=origin,
        negative_ttl=node.child("negative_ttl").duration(min(ttl, 60.0)),
        stale_while_revalidate=node.child("stale_while_revalidate").duration(0.0),
        stale_if_error=node.child("stale_if_error").duration(0.0),
        refresh_ahead=ahead,
        closed_ttl=closed_ttl,
        market=market,
    )


_CLASS_FIELDS = (
    "ttl", "negative_ttl", "stale_while_revalidate", "stale_if_error", "refresh_ahead",
    "closed_ttl", "market",
)  # fmt: skip


_ROUTE_FIELDS = (
    "name", "path", "methods", "query", "upstream", "ttl_class", "pass", "shared", "key_headers",
    "error_body", "cache_post",
)  # fmt: skip
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _route(
    index: int, node: Node, upstreams: Mapping[str, Upstream], classes: Mapping[str, TTLClass]
) -> Route:
    node.mapping(_ROUTE_FIELDS)
    name = node.child("name").text(f"route{index}")
    path_node = node.child("path")
    try:
        pattern, params = compile_template(path_node.text())
    except ValueError as e:
        raise path_node.error(str(e)) from e
    methods_node = node.child("methods")
    methods = tuple(m.upper() for m in methods_node.strings()) or ("GET", "HEAD")
    for i, method in enumerate(methods):
        if method not in _METHODS:
            raise methods_node.child(i).error(f"unsupported method {method!r}")
    upstream_node = node.child("upstream")
    upstream = upstream_node.text()
    if upstream not in upstreams:
        raise upstream_node.error(f"unknown upstream {upstream!r}")
    passthrough = node.child("pass").flag(False)
    class_node = node.child("ttl_class")
    ttl_class: TTLClass | None = None
    if class_node.present():
        class_name = class_node.text()
        if class_name not in classes:
            raise class_node.error(f"unknown class {class_name!r}")
        ttl_class = classes[class_name]
    elif not passthrough:
        raise class_node.error("is required unless the route sets 'pass: true'")
    query_node = node.child("query")
    conditions = tuple((key, frozenset(value.strings())) for key, value in query_node.items())
    return Route(
        name=name,
        template=path_node.text(),
        pattern=pattern,
        params=params,
        methods=frozenset(methods),
        query=conditions,
        upstream=upstream,
        ttl_class=None if passthrough else ttl_class,
        shared=node.child("shared").flag(False),
        key_headers=tuple(h.lower() for h in node.child("key_headers").strings()),
        cache_post=_cache_post(node, methods),
        **_error_body(node.child("error_body")),
    )


def _cache_post(node: Node, methods: tuple[str, ...]) -> bool:
    flag = node.child("cache_post")
    if flag.flag(False) and "POST" not in methods:
        raise flag.error("needs POST in the route's methods")
    return flag.flag(False)


def _error_body(node: Node) -> dict[str, Any]:
    node.mapping(("json_keys", "contains"))
    text = node.child("contains")
    markers = tuple(t.encode() for t in text.strings())
    if any(not m for m in markers):
        raise text.error("markers must not be empty strings")
    return {"error_keys": frozenset(node.child("json_keys").strings()), "error_text": markers}


def _redis(node: Node) -> RedisConfig:
    node.mapping(tuple(RedisConfig.__dataclass_fields__))
    d = RedisConfig()
    url_node = node.child("url")
    url = url_node.text(d.url)
    if url_node.url(d.url).scheme not in ("redis", "rediss", "unix"):
        raise url_node.error(f"expected a redis://, rediss:// or unix:// URL, got {url!r}")
    return RedisConfig(
        url=url,
        key_prefix=node.child("key_prefix").text(d.key_prefix),
        command_timeout=node.child("command_timeout").duration(d.command_timeout),
        connect_timeout=node.child("connect_timeout").duration(d.connect_timeout),
        breaker_failures=node.child("breaker_failures").integer(d.breaker_failures, minimum=1),
        breaker_backoff=node.child("breaker_backoff").duration(d.breaker_backoff),
        breaker_max_backoff=node.child("breaker_max_backoff").duration(d.breaker_max_backoff),
        lease_ttl=node.child("lease_ttl").duration(d.lease_ttl),
        lease_wait=node.child("lease_wait").duration(d.lease_wait),
        popularity_flush=node.child("popularity_flush").duration(d.popularity_flush),
    )


def _cache(node: Node) -> CacheConfig:
    node.mapping(("backend", "l1", "redis", "max_object_size", "keys"))
    backend = node.child("backend").text("memory")
    if backend not in BACKENDS:
        raise node.child("backend").error(f"expected one of {', '.join(BACKENDS)}, got {backend!r}")
    l1 = node.child("l1")
    l1.mapping(("max_entries", "max_memory"))
    keys = node.child("keys")
    keys.mapping(("ignore_params", "headers", "secret_params"))
    return CacheConfig(
        backend=backend,
        l1_max_entries=l1.child("max_entries").integer(1000, minimum=1),
        l1_max_bytes=l1.child("max_memory").size(100 * 1024 * 1024),
        redis=_redis(node.child("redis")),
        max_object_size=node.child("max_object_size").size(8 * 1024 * 1024),
        keys=KeyRules(
            ignore_params=frozenset(keys.child("ignore_params").strings())
            if keys.child("ignore_params").present()
            else frozenset({"_"}),
            headers=tuple(h.lower() for h in keys.child("headers").strings()),
            secret_params=frozenset(keys.child("secret_params").strings()),
        ),
    )


def parse_config(data: object, env: Mapping[str, str] | None = None) -> Config:
    """Validate parsed YAML (plus environment overrides) into a Config."""
    environ = os.environ if env is None else env
    root = Node(expand_tree(data, "", environ), "")
    if not isinstance(root.value, dict):
        raise ConfigError("", "the file must hold a mapping with upstreams, ttl_classes and routes")
    root.mapping(("upstreams", "markets", "ttl_classes", "routes", "cache", "server", "warm"))
    upstreams_node = root.child("upstreams")
    upstreams = {name: _upstream(name, node) for name, node in upstreams_node.items()}
    if not upstreams:
        raise upstreams_node.error("at least one upstream is required")
    markets = {name: Market.parse(name, node) for name, node in root.child("markets").items()}
    classes = {
        name: _ttl_class(name, node, markets) for name, node in root.child("ttl_classes").items()
    }
    routes_node = root.child("routes")
    routes = [_route(i, n, upstreams, classes) for i, n in enumerate(routes_node.sequence())]
    if not routes:
        raise routes_node.error("at least one route is required")
    seen: dict[str, int] = {}
    for i, route in enumerate(routes):
        if route.name in seen:
            raise (
                routes_node.child(i)
                .child("name")
                .error(f"duplicate route name {route.name!r} (also routes[{seen[route.name]}])")
            )
        seen[route.name] = i
    return Config(
        upstreams=upstreams,
        ttl_classes=classes,
        routes=RouteTable(tuple(routes)),
        markets=markets,
        cache=_apply_env_overrides(_cache(root.child("cache")), environ),
        server=ServerConfig.parse(root.child("server")),
        warm=WarmConfig.parse(root.child("warm")),
    )


def _apply_env_overrides(cache: CacheConfig, env: Mapping[str, str]) -> CacheConfig:
    """The seed's environment variables keep working and win over the file."""
    changes: dict[str, Any] = {}
    if backend := env.get("CACHE_BACKEND"):
        if backend not in BACKENDS:
            raise ConfigError(
                "CACHE_BACKEND", f"expected one of {', '.join(BACKENDS)}, got {backend!r}"
            )
        changes["backend"] = backend
    if url := env.get("CACHE_REDIS_URL"):
        if Node(url, "CACHE_REDIS_URL").url().scheme not in ("redis", "rediss", "unix"):
            raise ConfigError("CACHE_REDIS_URL", f"expected a redis:// URL, got {url!r}")
        changes["redis"] = replace(cache.redis, url=url)
    if entries := env.get("CACHE_L1_MAX_ENTRIES"):
        changes["l1_max_entries"] = Node(entries, "CACHE_L1_MAX_ENTRIES").integer(0, minimum=1)
    if megabytes := env.get("CACHE_L1_MAX_MEMORY_MB"):
        changes["l1_max_bytes"] = (
            Node(megabytes, "CACHE_L1_MAX_MEMORY_MB").integer(0, minimum=1) * 1024 * 1024
        )
    return replace(cache, **changes) if changes else cache


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML file; any problem is a ConfigError naming the field."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(path), f"cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), f"not UTF-8 text: {e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(where, f"not valid YAML: {getattr(e, 'problem', None) or e}") from e
    except (ValueError, RecursionError) as e:  # a date like 2026-13-45; nesting too deep
        raise ConfigError(str(path), f"not valid YAML: {e}") from e
    return parse_config(data, env)
