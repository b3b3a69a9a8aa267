"""Node: a YAML value with its path, so every validation error can say where it is."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar, cast

from yarl import URL

from proxy.errors import ConfigError
from proxy.units import expand_env, parse_duration, parse_size

T = TypeVar("T")


class Node:
    """A value read from YAML together with its path, so errors can say where."""

    __slots__ = ("path", "value")

    def __init__(self, value: object, path: str) -> None:
        self.value = value
        self.path = path

    def error(self, message: str) -> ConfigError:
        return ConfigError(self.path, message)

    def child(self, key: str | int) -> Node:
        if isinstance(key, int):
            if not isinstance(self.value, list):  # strings() reads a scalar as a 1-item list
                return self
            return Node(cast(list[object], self.value)[key], f"{self.path}[{key}]")
        value = self.value.get(key) if isinstance(self.value, dict) else None
        return Node(value, f"{self.path}.{key}" if self.path else key)

    def mapping(self, allowed: tuple[str, ...] | None = None) -> dict[str, object]:
        """The node as a mapping; unknown fields are errors (a typo must not pass silently)."""
        if self.value is None:
            return {}
        if not isinstance(self.value, dict):
            raise self.error(f"expected a mapping, got {type(self.value).__name__}")
        for key in self.value:
            if not isinstance(key, str):
                raise self.error(f"keys must be strings, got {key!r}")
            if allowed is not None and key not in allowed:
                raise self.child(key).error(f"unknown field (expected one of {', '.join(allowed)})")
        return cast(dict[str, object], self.value)

    def items(self) -> Iterator[tuple[str, Node]]:
        for key in self.mapping():
            yield key, self.child(key)

    def sequence(self) -> list[Node]:
        if self.value is None:
            return []
        if not isinstance(self.value, list):
            raise self.error(f"expected a list, got {type(self.value).__name__}")
        return [self.child(i) for i in range(len(self.value))]

    def present(self) -> bool:
        return self.value is not None

    def text(self, default: str | None = None) -> str:
        if self.value is None:
            if default is None:
                raise self.error("is required")
            return default
        if isinstance(self.value, bool) or not isinstance(self.value, str | int | float):
            raise self.error(f"expected a string, got {type(self.value).__name__}")
        return str(self.value)

    def url(self, default: str | None = None) -> URL:
        """A URL; one that does not parse (a port past 65535, a broken IPv6 literal) is an
        error naming this field, not a ValueError from yarl."""
        text = self.text(default)
        try:
            return URL(text)
        except ValueError as e:
            raise self.error(f"not a URL ({e}): {text!r}") from e

    def convert(self, parse: Callable[[object], T], default: T) -> T:
        if self.value is None:
            return default
        try:
            return parse(self.value)
        except ValueError as e:
            raise self.error(str(e)) from e

    def integer(self, default: int, minimum: int = 0) -> int:
        value = self.convert(parse_int, default)
        if value < minimum:
            raise self.error(f"must be at least {minimum}, got {value}")
        return value

    def fraction(self, default: float) -> float:
        """A number such as 0.8, or a percentage such as 80%."""
        return self.convert(_parse_fraction, default)

    def duration(self, default: float) -> float:
        return self.convert(parse_duration, default)

    def size(self, default: int) -> int:
        return self.convert(parse_size, default)

    def flag(self, default: bool) -> bool:
        if self.value is None:
            return default
        if not isinstance(self.value, bool):
            raise self.error(f"expected true or false, got {self.value!r}")
        return self.value

    def strings(self) -> tuple[str, ...]:
        """A string or a list of strings."""
        if isinstance(self.value, str | int | float) and not isinstance(self.value, bool):
            return (str(self.value),)
        return tuple(n.text() for n in self.sequence())

    def string_map(self) -> dict[str, str]:
        return {key: node.text() for key, node in self.items()}


def parse_int(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ValueError(f"expected an integer, got {value!r}")


def expand_tree(
    value: object, path: str, env: Mapping[str, str], _inside: frozenset[int] = frozenset()
) -> object:
    """Expand ${VAR} inside every string scalar (after parsing, so values cannot break YAML)."""
    if isinstance(value, str):
        try:
            return expand_env(value, env)
        except KeyError as e:
            raise ConfigError(path, f"environment variable {e.args[0]} is not set") from e
    if isinstance(value, list | dict):
        if id(value) in _inside:  # YAML's `&a [*a]` is a list that contains itself
            raise ConfigError(path, "contains itself (a recursive YAML alias)")
        inside = _inside | {id(value)}
        if isinstance(value, list):
            return [expand_tree(v, f"{path}[{i}]", env, inside) for i, v in enumerate(value)]
        return {
            k: expand_tree(v, f"{path}.{k}" if path else str(k), env, inside)
            for k, v in value.items()
        }
    return value


def _parse_fraction(value: object) -> float:
    if isinstance(value, str) and value.strip().endswith("%"):
        value = value.strip()[:-1]
        scale = 0.01
    else:
        scale = 1.0
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        return float(value) * scale
    except ValueError as e:
        raise ValueError(f"expected a number, got {value!r}") from e
