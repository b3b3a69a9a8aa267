"""proxy/config.py and proxy/units.py: every invalid config names its field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.authority import Authority
from proxy.config import load_config, parse_config
from proxy.errors import ConfigError
from proxy.units import expand_env, parse_duration, parse_size

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "proxy.yaml"


def minimal() -> dict[str, Any]:
    """The smallest valid config; tests break one field at a time."""
    return {
        "upstreams": {"api": {"url": "http://127.0.0.1:9000"}},
        "ttl_classes": {"news": {"ttl": "15m"}, "short": 60},
        "routes": [
            {"name": "news", "path": "/v2/finance/news", "upstream": "api", "ttl_class": "news"},
            {"name": "chart", "path": "/v8/finance/chart/{symbol}", "upstream": "api",
             "ttl_class": "short"},
        ],
    }  # fmt: skip


def with_change(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """minimal() with the value at path set (or a new key added)."""
    data = minimal()
    node: Any = data
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]
    node[path[-1]] = value
    return data


def without(path: tuple[Any, ...]) -> dict[str, Any]:
    data = minimal()
    node: Any = data
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return data


def test_minimal_config_is_valid() -> None:
    config = parse_config(minimal(), env={})
    assert [r.name for r in config.routes] == ["news", "chart"]
    assert config.ttl_classes["news"].ttl == 900
    assert config.ttl_classes["short"].ttl == 60
    assert config.ttl_classes["short"].negative_ttl == 60  # min(ttl, 60)
    assert config.ttl_classes["news"].negative_ttl == 60
    assert str(config.upstreams["api"].url) == "http://127.0.0.1:9000"
    assert config.cache.backend == "memory"
    assert config.server.admin_host == "127.0.0.1"


INVALID = [
    pytest.param(with_change(("routes", 1, "ttl_class"), "newz"),
                 "routes[1].ttl_class", "unknown class 'newz'", id="unknown-ttl-class"),
    pytest.param(with_change(("routes", 0, "upstream"), "yahooo"),
                 "routes[0].upstream", "unknown upstream 'yahooo'", id="unknown-upstream"),
    pytest.param(without(("routes", 0, "upstream")),
                 "routes[0].upstream", "is required", id="missing-upstream"),
    pytest.param(without(("routes", 0, "ttl_class")),
                 "routes[0].ttl_class", "is required unless", id="missing-ttl-class"),
    pytest.param(with_change(("ttl_classes", "news", "ttl"), "5 minutes"),
                 "ttl_classes.news.ttl", "not a duration", id="bad-duration"),
    pytest.param(with_change(("ttl_classes", "short"), "soon"),
                 "ttl_classes.short", "not a duration", id="bad-shorthand-duration"),
    pytest.param(with_change(("ttl_classes", "news", "ttl"), -5),
                 "ttl_classes.news.ttl", "must not be negative", id="negative-duration"),
    pytest.param(with_change(("ttl_classes", "news"), {"negative_ttl": 10}),
                 "ttl_classes.news.ttl", "is required", id="class-without-ttl"),
    pytest.param(with_change(("upstreams", "api", "timeout"), "fast"),
                 "upstreams.api.timeout", "not a duration", id="bad-timeout"),
    pytest.param(with_change(("cache",), {"l1": {"max_memory": "100 megs"}}),
                 "cache.l1.max_memory", "not a size", id="bad-size"),
    pytest.param(with_change(("cache",), {"max_object_size": "8XB"}),
                 "cache.max_object_size", "not a size", id="bad-object-size"),
    pytest.param(with_change(("cache",), {"l1": {"max_entries": 0}}),
                 "cache.l1.max_entries", "must be at least 1", id="zero-entries"),
    pytest.param(with_change(("rotues",), []),
                 "rotues", "unknown field", id="typo-top-level"),
    pytest.param(with_change(("upstreams", "api", "timout"), "5s"),
                 "upstreams.api.timout", "unknown field", id="typo-upstream"),
    pytest.param(with_change(("ttl_classes", "news", "negativ_ttl"), "1m"),
                 "ttl_classes.news.negativ_ttl", "unknown field", id="typo-ttl-class"),
    pytest.param(with_change(("routes", 0, "ttlclass"), "news"),
                 "routes[0].ttlclass", "unknown field", id="typo-route"),
    pytest.param(with_change(("cache",), {"backnd": "redis"}),
                 "cache.backnd", "unknown field", id="typo-cache"),
    pytest.param(with_change(("cache",), {"l1": {"max_entires": 5}}),
                 "cache.l1.max_entires", "unknown field", id="typo-cache-l1"),
    pytest.param(with_change(("cache",), {"keys": {"ignore_param": ["_"]}}),
                 "cache.keys.ignore_param", "unknown field", id="typo-cache-keys"),
    pytest.param(with_change(("server",), {"prot": 80}),
                 "server.prot", "unknown field", id="typo-server"),
    pytest.param(without(("upstreams", "api", "url")),
                 "upstreams.api.url", "is required", id="missing-url"),
    pytest.param(with_change(("upstreams", "api", "url"), "ftp://example.com"),
                 "upstreams.api.url", "expected an absolute http(s) URL", id="non-http-url"),
    pytest.param(with_change(("upstreams", "api", "url"), "/relative/path"),
                 "upstreams.api.url", "expected an absolute http(s) URL", id="relative-url"),
    pytest.param(with_change(("upstreams", "api", "url"), "http://x.test/api?key=1"),
                 "upstreams.api.url", "must not carry a query", id="url-with-query"),
    pytest.param(with_change(("routes", 1, "name"), "news"),
                 "routes[1].name", "duplicate route name 'news' (also routes[0])",
                 id="duplicate-route-name"),
    pytest.param(with_change(("routes", 0, "methods"), ["GET", "FETCH"]),
                 "routes[0].methods[1]", "unsupported method 'FETCH'", id="bad-method"),
    pytest.param(with_change(("routes", 1, "path"), "/v8/finance/chart/{"),
                 "routes[1].path", "malformed parameter", id="template-open-brace"),
    pytest.param(with_change(("routes", 1, "path"), "v8/chart"),
                 "routes[1].path", "must start with '/'", id="template-no-slash"),
    pytest.param(with_change(("routes", 1, "path"), "/a/{x}/{x}"),
                 "routes[1].path", "appears twice", id="template-duplicate-param"),
    pytest.param(without(("routes", 0, "path")),
                 "routes[0].path", "is required", id="missing-path"),
    pytest.param(with_change(("routes",), []),
                 "routes", "at least one route is required", id="no-routes"),
    pytest.param(without(("routes",)),
                 "routes", "at least one route is required", id="routes-absent"),
    pytest.param(with_change(("routes",), {"name": "x"}),
                 "routes", "expected a list", id="routes-not-a-list"),
    pytest.param(with_change(("upstreams",), {}),
                 "upstreams", "at least one upstream is required", id="no-upstreams"),
    pytest.param(with_change(("server",), {"port": 70000}),
                 "server.port", "must be at most 65535", id="port-too-big"),
    pytest.param(with_change(("server",), {"admin_port": 99999}),
                 "server.admin_port", "must be at most 65535", id="admin-port-too-big"),
    pytest.param(with_change(("server",), {"port": "http"}),
                 "server.port", "expected an integer", id="port-not-a-number"),
    pytest.param(with_change(("server",), {"port": -1}),
                 "server.port", "must be at least 0", id="negative-port"),
    pytest.param(with_change(("server",), {"log_level": "verbose"}),
                 "server.log_level", "expected debug, info, warning or error",
                 id="bad-log-level"),
    pytest.param(with_change(("cache",), {"backend": "mongo"}),
                 "cache.backend", "expected one of memory, redis, layered, got 'mongo'",
                 id="bad-backend"),
    pytest.param(with_change(("server",), {"admin_host": "0.0.0.0"}),
                 "server.admin_host", "without admin_token", id="public-admin-without-token"),
    pytest.param(with_change(("server",), {"admin_host": "admin.example.com"}),
                 "server.admin_host", "without admin_token", id="hostname-admin-without-token"),
    pytest.param(with_change(("routes", 0, "pass"), "yes"),
                 "routes[0].pass", "expected true or false", id="pass-not-a-bool"),
    pytest.param(with_change(("server",), {"admin_allowed_hosts": ["ok.internal", "http://x"]}),
                 "server.admin_allowed_hosts[1]", "expected host or host:port",
                 id="allowed-host-with-scheme"),
    pytest.param(with_change(("server",), {"admin_allowed_hosts": ["*.svc.cluster.local"]}),
                 "server.admin_allowed_hosts[0]", "expected host or host:port",
                 id="allowed-host-wildcard"),
    pytest.param(with_change(("server",), {"admin_allowed_hosts": "admin.internal:99999"}),
                 "server.admin_allowed_hosts", "port must be between 1 and 65535",
                 id="allowed-host-bad-port"),
    pytest.param(with_change(("server",), {"admin_allowed_hosts": ["a..b"]}),
                 "server.admin_allowed_hosts[0]", "not a host name", id="allowed-host-empty-label"),
    pytest.param(with_change(("server",), {"admin_allowed_hosts": ["[::1::2]"]}),
                 "server.admin_allowed_hosts[0]", "not an IPv6 address", id="allowed-host-bad-ip6"),
    pytest.param(with_change(("server",), {"admin_allowed_hosts": {"a": 1}}),
                 "server.admin_allowed_hosts", "expected a list", id="allowed-hosts-mapping"),
    pytest.param(with_change(("server",), {"admin_protect_metrics": "yes"}),
                 "server.admin_protect_metrics", "expected true or false",
                 id="protect-metrics-not-a-bool"),
    pytest.param(with_change(("server",), {"admin_protect_metrics": True}),
                 "server.admin_protect_metrics", "protects nothing without admin_token",
                 id="protect-metrics-without-token"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "path", "fragment"), INVALID)
def test_invalid_config_names_the_field(data: dict[str, Any], path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_config(data, env={})
    assert excinfo.value.path == path
    assert fragment in excinfo.value.message
    assert str(excinfo.value).startswith(f"{path}: ")


@pytest.mark.parametrize("data", [None, [], "routes: []", 42], ids=["null", "list", "str", "int"])
def test_top_level_must_be_a_mapping(data: object) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_config(data, env={})
    assert excinfo.value.path == ""
    assert "must hold a mapping" in str(excinfo.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_loopback_admin_host_needs_no_token(host: str) -> None:
    config = parse_config(with_change(("server",), {"admin_host": host}), env={})
    assert config.server.admin_host == host


def test_admin_allowed_hosts_are_parsed_into_authorities() -> None:
    hosts = ["Admin.Internal.", "cacheproxy-admin.prod.svc:8081", "[::1]:9000", "10.0.0.7"]
    data = with_change(("server",), {"admin_allowed_hosts": hosts})
    server = parse_config(data, env={}).server
    assert server.admin_allowed_hosts == {
        Authority("admin.internal"), Authority("cacheproxy-admin.prod.svc", 8081),
        Authority("::1", 9000), Authority("10.0.0.7"),
    }  # fmt: skip
    assert not server.admin_protect_metrics
    single = parse_config(with_change(("server",), {"admin_allowed_hosts": "a.b"}), env={})
    assert single.server.admin_allowed_hosts == {Authority("a.b")}
    assert parse_config(minimal(), env={}).server.admin_allowed_hosts == frozenset()


def test_public_admin_host_is_accepted_with_a_token() -> None:
    data = with_change(("server",), {"admin_host": "0.0.0.0", "admin_token": "s3cret"})
    config = parse_config(data, env={})
    assert config.server.admin_host == "0.0.0.0"
    assert config.server.admin_token == "s3cret"


def test_pass_route_needs_no_ttl_class() -> None:
    data = minimal()
    data["routes"].append(
        {"name": "post", "path": "/xhr/ncp", "methods": "POST", "upstream": "api", "pass": True}
    )
    route = parse_config(data, env={}).routes.routes[2]
    assert route.ttl_class is None
    assert route.methods == frozenset({"POST"})


def test_methods_default_to_get_and_head_and_are_upper_cased() -> None:
    data = with_change(("routes", 0, "methods"), ["get", "post"])
    routes = parse_config(data, env={}).routes.routes
    assert routes[0].methods == frozenset({"GET", "POST"})
    assert routes[1].methods == frozenset({"GET", "HEAD"})


# --- environment overrides ---------------------------------------------------------------


def test_env_overrides_win_over_the_file() -> None:
    data = with_change(
        ("cache",),
        {"backend": "memory", "redis": {"url": "redis://file:6379/0"},
         "l1": {"max_entries": 10, "max_memory": "1MB"}},
    )  # fmt: skip
    env = {
        "CACHE_BACKEND": "layered",
        "CACHE_REDIS_URL": "redis://env:6380/2",
        "CACHE_L1_MAX_ENTRIES": "5000",
        "CACHE_L1_MAX_MEMORY_MB": "256",
    }
    cache = parse_config(data, env=env).cache
    assert cache.backend == "layered"
    assert cache.redis.url == "redis://env:6380/2"
    assert cache.l1_max_entries == 5000
    assert cache.l1_max_bytes == 256 * 1024 * 1024


def test_without_env_the_file_values_hold() -> None:
    data = with_change(("cache",), {"backend": "redis", "l1": {"max_entries": 10}})
    cache = parse_config(data, env={}).cache
    assert cache.backend == "redis"
    assert cache.l1_max_entries == 10
    assert cache.l1_max_bytes == 100 * 1024 * 1024


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("CACHE_BACKEND", "mongo", "expected one of memory, redis, layered"),
        ("CACHE_L1_MAX_ENTRIES", "lots", "expected an integer"),
        ("CACHE_L1_MAX_ENTRIES", "0", "must be at least 1"),
        ("CACHE_L1_MAX_MEMORY_MB", "1.5GB", "expected an integer"),
        ("CACHE_L1_MAX_MEMORY_MB", "-1", "must be at least 1"),
    ],
)
def test_bad_env_override_names_the_variable(variable: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_config(minimal(), env={variable: value})
    assert excinfo.value.path == variable
    assert fragment in excinfo.value.message


# --- ${VAR} expansion ------------------------------------------------------------------


def test_env_expansion_with_and_without_default() -> None:
    data = minimal()
    data["upstreams"]["api"]["url"] = "${API_URL}"
    data["upstreams"]["api"]["query"] = {"apikey": "${AV_KEY}"}
    data["server"] = {"port": "${PORT:-8088}", "admin_token": "${TOKEN:-}"}
    config = parse_config(data, env={"API_URL": "https://api.example.com/base", "AV_KEY": "k1"})
    assert str(config.upstreams["api"].url) == "https://api.example.com/base"
    assert config.upstreams["api"].query == {"apikey": "k1"}
    assert config.server.port == 8088
    assert config.server.admin_token == ""


def test_env_value_beats_default_and_empty_value_takes_default() -> None:
    data = with_change(("server",), {"port": "${PORT:-8088}", "admin_port": "${APORT:-9099}"})
    server = parse_config(data, env={"PORT": "9000", "APORT": ""}).server
    assert server.port == 9000
    assert server.admin_port == 9099


@pytest.mark.parametrize(
    ("path", "value", "where", "var"),
    [
        (("upstreams", "api", "url"), "${API_URL}", "upstreams.api.url", "API_URL"),
        (("routes", 1, "upstream"), "${UPSTREAM}", "routes[1].upstream", "UPSTREAM"),
        (("server",), {"admin_token": "Bearer ${TOKEN}"}, "server.admin_token", "TOKEN"),
    ],
)
def test_unset_env_var_without_default_names_the_field(
    path: tuple[Any, ...], value: Any, where: str, var: str
) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_config(with_change(path, value), env={"OTHER": "x"})
    assert excinfo.value.path == where
    assert f"environment variable {var} is not set" in excinfo.value.message


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${A}", {"A": "1"}, "1"),
        ("x-${A}-${B}", {"A": "1", "B": "2"}, "x-1-2"),
        ("${A:-dflt}", {}, "dflt"),
        ("${A:-dflt}", {"A": ""}, "dflt"),
        ("${A:-dflt}", {"A": "set"}, "set"),
        ("${A:-}", {}, ""),
        ("${A}", {"A": ""}, ""),
        ("no vars $A {A}", {}, "no vars $A {A}"),
    ],
)
def test_expand_env(text: str, env: dict[str, str], expected: str) -> None:
    assert expand_env(text, env) == expected


def test_expand_env_unset_raises_key_error_naming_the_variable() -> None:
    with pytest.raises(KeyError) as excinfo:
        expand_env("${MISSING}", {})
    assert excinfo.value.args[0] == "MISSING"


# --- units ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (300, 300.0), (0, 0.0), (2.5, 2.5), ("300", 300.0), ("300s", 300.0), ("5m", 300.0),
        ("1h", 3600.0), ("250ms", 0.25), ("1.5d", 129600.0), (" 15m ", 900.0), ("10 s", 10.0),
    ],
)  # fmt: skip
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["5 minutes", "", "m", "-5s", "5w", "1h30m", True, None, -1, [5]])
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (1048576, 1048576), ("1048576", 1048576), ("100MB", 100 * 1024**2), ("512KB", 512 * 1024),
        ("512kb", 512 * 1024), ("1GB", 1024**3), ("8MiB", 8 * 1024**2), ("1.5MB", 1572864),
        ("10b", 10), (0, 0),
    ],
)  # fmt: skip
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["100 megs", "", "MB", "-1MB", "1TB", True, None, -1, 1.5])
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [("max_memory", "100MB", 100 * 1024**2), ("max_memory", "512KB", 512 * 1024),
     ("max_memory", 1048576, 1048576)],
)  # fmt: skip
def test_sizes_in_config(field: str, value: object, expected: int) -> None:
    config = parse_config(with_change(("cache",), {"l1": {field: value}}), env={})
    assert config.cache.l1_max_bytes == expected


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(300, 300.0), ("300s", 300.0), ("5m", 300.0), ("1h", 3600.0), ("250ms", 0.25),
     ("1.5d", 129600.0)],
)  # fmt: skip
def test_durations_in_config(value: object, seconds: float) -> None:
    config = parse_config(with_change(("ttl_classes", "news", "ttl"), value), env={})
    assert config.ttl_classes["news"].ttl == pytest.approx(seconds)


# --- files ------------------------------------------------------------------------------


def test_load_config_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as excinfo:
        load_config(missing, env={})
    assert excinfo.value.path == str(missing)
    assert "cannot read" in excinfo.value.message


def test_load_config_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams:\n  api:\n    url: [unclosed\nroutes: []\n", encoding="utf-8")
    with pytest.raises(ConfigError) as excinfo:
        load_config(bad, env={})
    assert excinfo.value.path.startswith(f"{bad}:")
    line = int(excinfo.value.path.removeprefix(f"{bad}:").split(":")[0])
    assert line in (3, 4)  # the flow sequence opened on line 3 is broken by line 4
    assert "not valid YAML" in excinfo.value.message


def test_load_config_validates_the_file(tmp_path: Path) -> None:
    data = copy.deepcopy(minimal())
    bad = tmp_path / "bad.yaml"
    data["routes"][0]["ttl_class"] = "newz"
    bad.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ConfigError) as excinfo:
        load_config(bad, env={})
    assert str(excinfo.value) == "routes[0].ttl_class: unknown class 'newz'"


DESIGN_TTLS = {
    "trending": 300,
    "stock_detail": 300,
    "news": 900,
    "chart_5d": 300,
    "chart_1mo": 1800,
    "chart_3mo_plus": 3600,
    "briefing_detail": 3600,
    "briefing_list": 600,
}


def test_shipped_config_has_the_design_ttls() -> None:
    config = load_config(SHIPPED, env={})
    for name, seconds in DESIGN_TTLS.items():
        assert config.ttl_classes[name].ttl == seconds, name


@pytest.mark.parametrize(
    ("path", "query", "route", "ttl_class", "ttl"),
    [
        ("/v8/finance/chart/AAPL", {"range": "5d"}, "chart_5d", "chart_5d", 300),
        ("/v8/finance/chart/AAPL", {"range": "1d", "interval": "1m"}, "chart_5d", "chart_5d", 300),
        ("/v8/finance/chart/MSFT", {"range": "1mo"}, "chart_1mo", "chart_1mo", 1800),
        ("/v8/finance/chart/MSFT", {"range": "3mo"}, "chart_3mo_plus", "chart_3mo_plus", 3600),
        ("/v8/finance/chart/MSFT", {"range": "1y"}, "chart_3mo_plus", "chart_3mo_plus", 3600),
        ("/v8/finance/chart/MSFT", {"range": "max"}, "chart_3mo_plus", "chart_3mo_plus", 3600),
        ("/v8/finance/chart/MSFT", {}, "chart_default", "chart_1mo", 1800),
        ("/v1/finance/trending/US", {}, "trending", "trending", 300),
        ("/v10/finance/quoteSummary/AAPL", {}, "stock_detail", "stock_detail", 300),
        ("/v2/finance/news", {}, "news", "news", 900),
        ("/briefings", {}, "briefing_list", "briefing_list", 600),
        ("/briefings/42", {}, "briefing_detail", "briefing_detail", 3600),
    ],
)  # fmt: skip
def test_shipped_config_routes_by_shape_and_range(
    path: str, query: dict[str, str], route: str, ttl_class: str, ttl: int
) -> None:
    config = load_config(SHIPPED, env={})
    match = config.routes.match("GET", path, query)
    assert match is not None
    assert match.route.name == route
    assert match.route.ttl_class is not None
    assert match.route.ttl_class.name == ttl_class
    assert match.route.ttl_class.ttl == ttl


def test_shipped_config_does_not_route_unknown_paths() -> None:
    config = load_config(SHIPPED, env={})
    assert config.routes.match("GET", "/v7/finance/options/AAPL", {}) is None
    assert config.routes.match("GET", "/v8/finance/chart/AAPL/extra", {}) is None


def test_upstream_url_with_credentials_is_refused() -> None:
    data = {
        "upstreams": {"api": {"url": "http://user:hunter2@api.example"}},
        "ttl_classes": {"t": 60},
        "routes": [{"path": "/x", "upstream": "api", "ttl_class": "t"}],
    }
    with pytest.raises(ConfigError) as e:
        parse_config(data, env={})
    assert e.value.path == "upstreams.api.url"
    assert "hunter2" not in str(e.value)


@pytest.mark.parametrize("name", ["my api", "", "api\t2", "api\n"])
def test_upstream_names_that_cannot_go_into_a_cache_key_are_refused(name: str) -> None:
    data = {
        "upstreams": {name: {"url": "http://api.example"}},
        "ttl_classes": {"t": 60},
        "routes": [{"path": "/x", "upstream": name, "ttl_class": "t"}],
    }
    with pytest.raises(ConfigError, match="cache keys") as e:
        parse_config(data, env={})
    assert e.value.path == f"upstreams.{name}"


# --- found by tests/test_fuzz.py ------------------------------------------------------------


@pytest.mark.parametrize(
    "value", [float("inf"), float("nan"), 10**400, "9" * 400, "9" * 400 + "s", "1e999"]
)
def test_parse_duration_rejects_what_is_not_a_finite_number(value: object) -> None:
    # inf and nan were accepted (`ttl: .inf` loaded); 10**400 raised OverflowError.
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize("value", ["9" * 400, "9" * 400 + "GB"])
def test_parse_size_rejects_what_overflows(value: str) -> None:
    with pytest.raises(ValueError):  # int(float("inf")) raised OverflowError
        parse_size(value)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 10**400])
def test_non_finite_durations_name_the_field(value: object) -> None:
    data = with_change(("ttl_classes", "news", "ttl"), value)
    with pytest.raises(ConfigError, match=r"^ttl_classes\.news\.ttl: "):
        parse_config(data, env={})


@pytest.mark.parametrize(
    ("path", "value", "where"),
    [
        (("routes", 0, "methods"), 5, "routes[0].methods: unsupported method '5'"),
        (("routes", 0, "methods"), "", "routes[0].methods: unsupported method ''"),
        (("warm", "urls"), 5, "warm.urls: expected a path"),
    ],
)
def test_a_scalar_where_a_list_may_be_names_the_field(
    path: tuple[Any, ...], value: object, where: str
) -> None:
    # A scalar is read as a one-item list; its error looked up item [0] of the scalar and
    # raised TypeError or IndexError.
    with pytest.raises(ConfigError) as caught:
        parse_config(with_change(path, value), env={})
    assert str(caught.value).startswith(where)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"\xff\xfe not utf-8", "not UTF-8 text"),
        (b"holidays: [2026-13-45]", "not valid YAML: month must be in 1..12"),
        (b"port: " + b"9" * 5000, "not valid YAML: Exceeds the limit"),
        (b"[" * 2000 + b"]" * 2000, "not valid YAML: maximum recursion depth"),
        (b"upstreams: &u [*u]", "upstreams[0]: contains itself (a recursive YAML alias)"),
        (b"a: &x {b: *x}", "a.b: contains itself"),
    ],
)
def test_load_config_turns_every_bad_file_into_a_config_error(
    tmp_path: Path, content: bytes, fragment: str
) -> None:
    # Each of these escaped as UnicodeDecodeError, ValueError or RecursionError.
    path = tmp_path / "proxy.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("where", "url"),
    [("upstreams.api.url", "http://api.example:99999"),
     ("upstreams.api.url", "http://[::1"),
     ("cache.redis.url", "redis://127.0.0.1:70000/0"),
     ("cache.redis.url", "redis://[::1/0"),
     ("CACHE_REDIS_URL", "redis://[x")],
)  # fmt: skip
def test_a_url_that_does_not_parse_is_a_config_error(where: str, url: str) -> None:
    # Found by the config fuzzer: yarl's ValueError (a port past 65535, a broken IPv6
    # literal) escaped parse_config as a traceback.
    data = minimal()
    env = {}
    if where == "upstreams.api.url":
        data["upstreams"]["api"]["url"] = url
    elif where == "cache.redis.url":
        data["cache"] = {"backend": "layered", "redis": {"url": url}}
    else:
        env = {"CACHE_REDIS_URL": url}
    with pytest.raises(ConfigError) as e:
        parse_config(data, env=env)
    assert e.value.path == where
