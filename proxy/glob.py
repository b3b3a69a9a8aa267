"""Redis-style globs as values, matched without backtracking (issue 11, finding 1)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final, NamedTuple

# The longest glob a client may send to the admin API: far longer than any glob a person
# writes, and it bounds the work of matching one (see Glob).
MAX_LENGTH: Final = 1024
# The longest glob one instance takes from another: admin's whole-key form of a client's glob
# (CacheKey.url_glob, 4 characters longer), the only pattern purge any instance publishes;
# tests/test_keys.py holds the two to each other.
MAX_EVENT_LENGTH: Final = MAX_LENGTH + 4


def bounded(text: str, max_length: int = MAX_LENGTH) -> str:
    """`text`, or ValueError when it is too long to be matched as a glob."""
    if len(text) > max_length:
        raise ValueError(f"at most {max_length} characters (this one has {len(text)})")
    return text


@dataclass(frozen=True, slots=True)
class Glob:
    """A glob over cache keys: `*`, `?`, `[abc]`, `[^a]`/`[!a]`, `[a-z]` (reversed ends
    swapped, as Redis does), `\\x` escapes; an unclosed `[` is literal.

    Kept as the fixed-width pieces between its stars. A key matches when the first piece
    matches its start, the last its end, and each middle piece is found, leftmost, after the
    one before: a star never needs to take back what it skipped, since a piece found further
    left leaves more room for the rest. The middle pieces are one regex of atomic groups,
    `(?>.*?piece)`, which commit to that leftmost find, so nothing backtracks across stars:
    matching costs at most O(len(key) * len(glob)) steps, in C, whatever the glob
    (`*?*?*?...#` costs what `???...*#` costs). Compiled to one plain regex, `.*.*.*...#`
    backtracked exponentially.
    """

    text: str
    # What every matching key starts with: the characters before the first `*`, `?` or
    # class, unescaped. Redis is only ever asked to SCAN for this prefix (see RedisStore).
    literal_prefix: str = field(repr=False, compare=False)
    _head: re.Pattern[str] = field(repr=False, compare=False)  # up to the last star
    _tail: re.Pattern[str] = field(repr=False, compare=False)  # after it: the key's end
    _tail_width: int = field(repr=False, compare=False)
    _starred: bool = field(repr=False, compare=False)

    @classmethod
    def parse(cls, text: str, max_length: int | None = MAX_LENGTH) -> Glob:
        """The glob `text` spells; ValueError past `max_length` characters (None: a glob
        the proxy built itself, such as an escaped key and ` *`)."""
        if max_length is not None:
            bounded(text, max_length)
        atoms = _atoms(text)
        prefix = ""
        for atom in atoms:
            if atom is None or atom.literal is None:
                break
            prefix += atom.literal
        pieces: list[list[str]] = [[]]
        star = False
        for atom in atoms:
            if atom is None:
                star = True
            elif atom.regex == "." or not star:
                pieces[-1].append(atom.regex)  # `*?` matches what `?*` does: ? joins the piece
            else:
                pieces.append([atom.regex])  # the piece after a run of stars starts here
                star = False
        if star:
            pieces.append([])  # a trailing star: nothing to match at the end
        texts = ["".join(p) for p in pieces]
        starred = len(texts) > 1
        head = texts[0] + "".join(f"(?>.*?{t})" for t in texts[1:-1]) if starred else ""
        return cls(
            text,
            prefix,
            re.compile(head, re.DOTALL),
            re.compile(texts[-1], re.DOTALL),
            len(pieces[-1]),
            starred,
        )

    def matches(self, key: str) -> bool:
        """Whether the whole key matches."""
        if not self._starred:
            return self._tail.fullmatch(key) is not None
        tail_at = len(key) - self._tail_width
        return (
            tail_at >= 0
            and self._tail.fullmatch(key, tail_at) is not None
            and self._head.match(key, 0, tail_at) is not None
        )

    def __str__(self) -> str:
        return self.text


class _Atom(NamedTuple):
    """One character of a glob: its regex, and the character itself if it is literal."""

    regex: str
    literal: str | None = None


def _atoms(pattern: str) -> list[_Atom | None]:
    """The glob as one-character regexes, None for a star."""
    atoms: list[_Atom | None] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            atoms.append(_Atom(re.escape(pattern[i + 1]), pattern[i + 1]))
            i += 2
            continue
        if c == "*":
            atoms.append(None)
        elif c == "?":
            atoms.append(_Atom("."))
        elif c == "[" and (end := pattern.find("]", i + 2)) != -1:
            atoms.append(_Atom(_class(pattern[i + 1 : end])))
            i = end + 1
            continue
        else:
            atoms.append(_Atom(re.escape(c), c))
        i += 1
    return atoms


def _class(body: str) -> str:
    """A `[...]` body as a one-character regex: a leading `^` or `!` negates, `a-z` is a
    range (reversed ends swapped, as Redis does), anything else is literal. Never an
    invalid regex."""
    negate = body[:1] in ("^", "!")
    body = body[1:] if negate else body
    items: list[str] = []
    j = 0
    while j < len(body):
        if j + 2 < len(body) and body[j + 1] == "-":
            low, high = sorted((body[j], body[j + 2]))
            items.append(f"{re.escape(low)}-{re.escape(high)}")
            j += 3
        else:
            items.append(re.escape(body[j]))
            j += 1
    if not items:  # `[^]`: any one character
        return "."
    return f"[{'^' if negate else ''}{''.join(items)}]"
