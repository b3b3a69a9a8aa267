"""Ordered route table: (method, path, query) -> the first Route that matches."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from proxy.policy import TTLClass

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def compile_template(template: str) -> tuple[re.Pattern[str], tuple[str, ...]]:
    """`/v8/finance/chart/{symbol}` -> a regex where each {param} is one path segment."""
    if not template.startswith("/"):
        raise ValueError(f"must start with '/', got {template!r}")
    if "?" in template or "#" in template:
        raise ValueError("must not contain '?' or '#' (use 'query:' for query conditions)")
    names: list[str] = []
    parts: list[str] = []
    position = 0
    for m in _PARAM.finditer(template):
        literal = template[position : m.start()]
        if "{" in literal or "}" in literal:
            raise ValueError(f"malformed parameter in {template!r}")
        parts.append(re.escape(literal))
        name = m.group(1)
        if name in names:
            raise ValueError(f"parameter {{{name}}} appears twice")
        names.append(name)
        parts.append(f"(?P<{name}>[^/]+)")
        position = m.end()
    tail = template[position:]
    if "{" in tail or "}" in tail:
        raise ValueError(f"malformed parameter in {template!r}")
    parts.append(re.escape(tail))
    return re.compile("".join(parts)), tuple(names)


@dataclass(frozen=True, slots=True)
class Route:
    """One URL shape, the upstream it goes to, and how its responses are cached."""

    name: str
    template: str
    pattern: re.Pattern[str]
    params: tuple[str, ...]
    methods: frozenset[str]
    query: tuple[tuple[str, frozenset[str]], ...]  # name -> accepted values ("*" = any)
    upstream: str
    ttl_class: TTLClass | None  # None: forward uncached ("pass")
    shared: bool = False  # responses to requests with Authorization/Cookie may be shared
    key_headers: tuple[str, ...] = ()
    cache_post: bool = False  # POSTs are cached, keyed on a hash of their body
    # A 200 whose JSON has one of these top-level keys, or whose body contains one of these
    # byte strings, is an API error in disguise (Alpha Vantage's {"Note": ...}).
    error_keys: frozenset[str] = frozenset()
    error_text: tuple[bytes, ...] = ()

    def accepts_query(self, query: Mapping[str, str]) -> bool:
        """Every condition holds: the parameter is present with one of the listed values."""
        for name, values in self.query:
            value = query.get(name)
            if value is None or ("*" not in values and value not in values):
                return False
        return True


@dataclass(frozen=True, slots=True)
class Match:
    """A matched route and the path parameters it captured."""

    route: Route
    params: Mapping[str, str]


class RouteTable:
    """Routes in file order; the first that matches method, path and query wins."""

    __slots__ = ("routes",)

    def __init__(self, routes: tuple[Route, ...]) -> None:
        self.routes = routes

    def __iter__(self) -> Iterator[Route]:
        return iter(self.routes)

    def __len__(self) -> int:
        return len(self.routes)

    def match(self, method: str, path: str, query: Mapping[str, str]) -> Match | None:
        """The first route whose method list, template and query conditions all accept."""
        for route in self.routes:
            if method not in route.methods:
                continue
            m = route.pattern.fullmatch(path)
            if m is None or not route.accepts_query(query):
                continue
            return Match(route, m.groupdict())
        return None

    def allowed_methods(self, path: str) -> frozenset[str]:
        """Methods some route accepts for this path (to tell 405 from 404)."""
        methods: set[str] = set()
        for route in self.routes:
            if route.pattern.fullmatch(path):
                methods |= route.methods
        return frozenset(methods)
