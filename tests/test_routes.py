"""proxy/routes.py: template compilation and first-match-wins routing."""

from __future__ import annotations

import pytest

from proxy.policy import TTLClass
from proxy.routes import Route, RouteTable, compile_template

CLASS = TTLClass("c", ttl=60, negative_ttl=10)


def route(
    name: str,
    template: str,
    methods: tuple[str, ...] = ("GET", "HEAD"),
    query: dict[str, tuple[str, ...]] | None = None,
) -> Route:
    pattern, params = compile_template(template)
    return Route(
        name=name,
        template=template,
        pattern=pattern,
        params=params,
        methods=frozenset(methods),
        query=tuple((k, frozenset(v)) for k, v in (query or {}).items()),
        upstream="api",
        ttl_class=CLASS,
    )


@pytest.mark.parametrize(
    ("template", "path", "expected"),
    [
        ("/v8/finance/chart/{symbol}", "/v8/finance/chart/AAPL", {"symbol": "AAPL"}),
        ("/v8/finance/chart/{symbol}", "/v8/finance/chart/%5EGSPC", {"symbol": "%5EGSPC"}),
        ("/v8/finance/chart/{symbol}", "/v8/finance/chart/AAPL/x", None),
        ("/v8/finance/chart/{symbol}", "/v8/finance/chart/", None),
        ("/v8/finance/chart/{symbol}", "/v8/finance/chart", None),
        ("/v8/finance/chart/{symbol}", "/prefix/v8/finance/chart/AAPL", None),
        ("/a/{x}/b/{y}", "/a/1/b/2", {"x": "1", "y": "2"}),
        ("/a/{x}/b/{y}", "/a/1/c/2", None),
        ("/a/{x}/b/{y}", "/a/1/2/b/3", None),  # a parameter never spans segments
        ("/files/{name}.json", "/files/report.json", {"name": "report"}),
        ("/files/{name}.json", "/files/reportXjson", None),  # '.' is literal
        ("/v1+/{x}", "/v1+/q", {"x": "q"}),
        ("/v1+/{x}", "/v11/q", None),  # '+' is literal
        ("/a(b)/{x}", "/a(b)/q", {"x": "q"}),
        ("/a(b)/{x}", "/ab/q", None),
        ("/a|b", "/a|b", {}),
        ("/a|b", "/a", None),
        ("/briefings", "/briefings", {}),
        ("/briefings", "/briefings/", None),
        ("/", "/", {}),
        ("/{_id9}", "/x", {"_id9": "x"}),
    ],
)
def test_template_matching(template: str, path: str, expected: dict[str, str] | None) -> None:
    pattern, _ = compile_template(template)
    m = pattern.fullmatch(path)
    if expected is None:
        assert m is None
    else:
        assert m is not None
        assert m.groupdict() == expected


@pytest.mark.parametrize(
    ("template", "params"),
    [
        ("/static", ()),
        ("/v8/finance/chart/{symbol}", ("symbol",)),
        ("/a/{x}/b/{y}/{z}", ("x", "y", "z")),
    ],
)
def test_template_params_in_order(template: str, params: tuple[str, ...]) -> None:
    assert compile_template(template)[1] == params


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("v8/chart", "must start with '/'"),
        ("", "must start with '/'"),
        ("/a?range=5d", "must not contain '?' or '#'"),
        ("/a#frag", "must not contain '?' or '#'"),
        ("/a/{", "malformed parameter"),
        ("/a/}", "malformed parameter"),
        ("/a/{x", "malformed parameter"),
        ("/a/{}/b", "malformed parameter"),
        ("/a/{1x}", "malformed parameter"),
        ("/a/{x-y}", "malformed parameter"),
        ("/a/{{x}}", "malformed parameter"),
        ("/{x}/{", "malformed parameter"),
        ("/a/{x}/{x}", "appears twice"),
    ],
)
def test_template_errors(template: str, fragment: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        compile_template(template)
    assert fragment in str(excinfo.value)


CHART_TABLE = RouteTable(
    (
        route("chart_5d", "/v8/finance/chart/{symbol}", query={"range": ("1d", "5d")}),
        route("chart_1mo", "/v8/finance/chart/{symbol}", query={"range": ("1mo",)}),
        route("chart_any_interval", "/v8/finance/chart/{symbol}", query={"interval": ("*",)}),
        route("chart_default", "/v8/finance/chart/{symbol}"),
        route("chart_later", "/v8/finance/chart/{symbol}"),
        route("quote_post", "/quote/{symbol}", methods=("POST",)),
        route("quote", "/quote/{symbol}", methods=("GET", "HEAD")),
        route("both", "/both/{x}", query={"a": ("1",), "b": ("2", "3")}),
    )
)


@pytest.mark.parametrize(
    ("method", "path", "query", "expected", "params"),
    [
        ("GET", "/v8/finance/chart/AAPL", {"range": "5d"}, "chart_5d", {"symbol": "AAPL"}),
        ("GET", "/v8/finance/chart/AAPL", {"range": "1d"}, "chart_5d", {"symbol": "AAPL"}),
        ("GET", "/v8/finance/chart/AAPL", {"range": "1mo"}, "chart_1mo", {"symbol": "AAPL"}),
        ("GET", "/v8/finance/chart/AAPL", {"range": "5D"}, "chart_default", {"symbol": "AAPL"}),
        ("GET", "/v8/finance/chart/AAPL", {"range": "1y"}, "chart_default", {"symbol": "AAPL"}),
        # "*": present with any value (even empty), absent does not count
        ("GET", "/v8/finance/chart/X", {"interval": "1m"}, "chart_any_interval", {"symbol": "X"}),
        ("GET", "/v8/finance/chart/X", {"interval": ""}, "chart_any_interval", {"symbol": "X"}),
        ("GET", "/v8/finance/chart/X", {"range": "5d", "interval": "1m"}, "chart_5d",
         {"symbol": "X"}),
        ("GET", "/v8/finance/chart/X", {}, "chart_default", {"symbol": "X"}),  # first wins
        ("HEAD", "/v8/finance/chart/X", {}, "chart_default", {"symbol": "X"}),
        ("POST", "/quote/AAPL", {}, "quote_post", {"symbol": "AAPL"}),
        ("GET", "/quote/AAPL", {}, "quote", {"symbol": "AAPL"}),
        ("GET", "/both/x", {"a": "1", "b": "3"}, "both", {"x": "x"}),
        ("GET", "/both/x", {"a": "1"}, None, None),  # every condition must hold
        ("GET", "/both/x", {"a": "2", "b": "2"}, None, None),
        ("POST", "/v8/finance/chart/AAPL", {}, None, None),
        ("DELETE", "/quote/AAPL", {}, None, None),
        ("GET", "/nowhere", {}, None, None),
        ("GET", "/v8/finance/chart/AAPL/", {}, None, None),
        ("get", "/quote/AAPL", {}, None, None),  # methods are upper-case on the wire
    ],
)  # fmt: skip
def test_route_table_match(
    method: str,
    path: str,
    query: dict[str, str],
    expected: str | None,
    params: dict[str, str] | None,
) -> None:
    match = CHART_TABLE.match(method, path, query)
    if expected is None:
        assert match is None
    else:
        assert match is not None
        assert match.route.name == expected
        assert dict(match.params) == params


@pytest.mark.parametrize(
    ("path", "methods"),
    [
        ("/quote/AAPL", {"GET", "HEAD", "POST"}),
        ("/v8/finance/chart/AAPL", {"GET", "HEAD"}),
        ("/nowhere", set()),
        ("/quote/AAPL/x", set()),
    ],
)
def test_allowed_methods(path: str, methods: set[str]) -> None:
    assert CHART_TABLE.allowed_methods(path) == frozenset(methods)


def test_table_iterates_in_order_and_has_a_length() -> None:
    assert len(CHART_TABLE) == 8
    assert [r.name for r in CHART_TABLE][:2] == ["chart_5d", "chart_1mo"]


def test_accepts_query_with_one_value_a_set_and_star() -> None:
    one = route("one", "/x", query={"range": ("5d",)})
    many = route("many", "/x", query={"range": ("5d", "1mo")})
    star = route("star", "/x", query={"range": ("*",)})
    assert one.accepts_query({"range": "5d"})
    assert not one.accepts_query({"range": "1mo"})
    assert many.accepts_query({"range": "1mo"})
    assert not many.accepts_query({"range": "3mo"})
    assert star.accepts_query({"range": "anything"})
    for r in (one, many, star):
        assert not r.accepts_query({})
        assert not r.accepts_query({"Range": "5d"})  # names are case-sensitive
