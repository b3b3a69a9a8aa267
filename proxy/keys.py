"""Request-target checks and cache-key normalisation (pure; no I/O)."""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import quote, unquote_to_bytes

from proxy.errors import BadRequest
from proxy.glob import bounded

# RFC 3986 3.3: pchar = unreserved / pct-encoded / sub-delims / ":" / "@". quote() always
# keeps ALPHA, DIGIT and "_.-~" (the unreserved set), so these are the extras.
_PATH_SAFE = "!$&'()*+,;=:@"
# In a query component, "&", "=" and "+" are structure (form encoding), so they stay encoded.
_QUERY_SAFE = "!$'()*,;:@/?"
_FORBIDDEN_BYTES = re.compile(rb"[\x00-\x1f\x7f\\]")
# Names of query parameters and key headers that look like credentials (apikey, api_token,
# access_key, X-Amz-Signature, passwd, pw, jwt, otp, Authorization, Cookie): their values
# are hashed in keys, which the admin API shows. A false positive (`monkey`, `compass`) only
# hides a value from the listing: the hash still keys it apart.
_SECRET_NAME = re.compile(
    r"key|token|secret|sig|pass|pw|jwt|otp|bearer|auth|session|cred|cookie", re.IGNORECASE
)


@dataclass(frozen=True, slots=True)
class Target:
    """A validated request target: normalised path and query, and decoded query values."""

    path: str
    # Normalised (still encoded) pairs in request order; the second item keeps its "=".
    query: tuple[tuple[str, str], ...]
    params: Mapping[str, str]  # decoded name -> first decoded value, for route conditions


def _normalise_component(raw: str, safe: str, plus_is_space: bool) -> tuple[str, bytes]:
    data = unquote_to_bytes(raw.replace("+", " ") if plus_is_space else raw)
    return quote(data, safe=safe), data


def parse_target(raw: str) -> Target:
    """Validate an origin-form request target and normalise its percent-encoding.

    Refuses absolute-form and authority-form targets (the proxy is never an open proxy),
    dot segments in any encoding (also with a `;` path parameter), backslashes and control
    characters.
    """
    if not raw.startswith("/") or raw.startswith("//"):
        raise BadRequest(
            "request target must be an origin-form path such as /v8/finance/chart/AAPL"
        )
    if not raw.isascii():
        try:  # bytes that are not UTF-8 arrive as lone surrogates (surrogateescape)
            raw.encode()
        except UnicodeEncodeError:
            raise BadRequest("request target is not valid UTF-8") from None
    raw, _, _fragment = raw.partition("#")  # never part of a request; dropped, not keyed
    path, _, query = raw.partition("?")
    segments: list[str] = []
    for segment in path.split("/")[1:]:
        encoded, data = _normalise_component(segment, _PATH_SAFE, plus_is_space=False)
        # An encoded slash must not smuggle a dot segment to an upstream that decodes it, nor
        # a path parameter (`..;x`), which Tomcat and Spring strip before resolving dots.
        parts = {part.partition(b";")[0] for part in data.split(b"/")}
        if _FORBIDDEN_BYTES.search(data) or {b".", b".."} & parts:
            raise BadRequest("path contains a dot segment, a backslash or a control character")
        if not data.isascii():
            try:  # strict: overlong forms (%C0%AE is a "." to a lax decoder) are refused
                data.decode()
            except UnicodeDecodeError:
                raise BadRequest("path is not valid UTF-8 once percent-decoded") from None
        segments.append(encoded)
    pairs: list[tuple[str, str]] = []
    params: dict[str, str] = {}
    for part in query.split("&") if query else ():
        if not part:
            continue
        name, eq, value = part.partition("=")
        name_enc, name_raw = _normalise_component(name, _QUERY_SAFE, plus_is_space=True)
        value_enc, value_raw = _normalise_component(value, _QUERY_SAFE, plus_is_space=True)
        pairs.append((name_enc, eq + value_enc))  # "=v", "=" or "": `?a` stays unlike `?a=`
        params.setdefault(name_raw.decode("utf-8", "replace"), value_raw.decode("utf-8", "replace"))
    return Target("/" + "/".join(segments), tuple(pairs), params)


def _utf8(text: str) -> bytes:
    # aiohttp hands over header bytes that are not UTF-8 as lone surrogates (surrogateescape);
    # surrogatepass encodes every str, and distinct strs to distinct bytes.
    return text.encode("utf-8", "surrogatepass")


@functools.lru_cache(maxsize=256)  # key headers' names: the config's, a handful
def _secret_header(name: str) -> bool:
    return _SECRET_NAME.search(name) is not None


def _redact(value: str) -> str:
    return "#" + hashlib.sha256(_utf8(value)).hexdigest()[:16]


@functools.lru_cache(maxsize=32)
def _encoded_names(names: frozenset[str]) -> frozenset[str]:
    """Configured parameter names as a normalised query spells them (`a[b]` -> `a%5Bb%5D`)."""
    return frozenset(quote(name, safe=_QUERY_SAFE, errors="surrogatepass") for name in names)


@functools.lru_cache(maxsize=32)
def _secret_names(names: frozenset[str]) -> frozenset[str]:
    """Configured secret names, encoded as a normalised query spells them, lower-cased."""
    return frozenset(name.lower() for name in _encoded_names(names))


@functools.lru_cache(maxsize=4096)  # names are the client's: bounded, and cheap to redo
def is_secret_param(name: str, configured: frozenset[str]) -> bool:
    """Whether a parameter (named as a normalised query spells it) carries a credential: its
    name looks like one, or is configured (`cache.keys.secret_params`); case-insensitive."""
    return _SECRET_NAME.search(name) is not None or name.lower() in _secret_names(configured)


def key_query(target: Target, ignore: frozenset[str], secret: frozenset[str]) -> str:
    """Sorted query for the key: ignored names dropped, repeats kept in order, secrets hashed."""
    ignore = _encoded_names(ignore)
    kept = [
        (name, "=" + _redact(value[1:]) if value and is_secret_param(name, secret) else value)
        for name, value in target.query
        if name not in ignore
    ]
    kept.sort(key=lambda pair: pair[0])  # stable: repeated names keep their relative order
    return "&".join(name + value for name, value in kept)


def body_digest(content_type: str, content_encoding: str, body: bytes) -> str:
    """A cached POST's key part: a hash of its body and of the headers that say how to read
    it, exactly as they go upstream (charset, boundary, coding: each can change the answer),
    never the body itself."""
    digest = hashlib.sha256()
    for part in (_utf8(content_type), _utf8(content_encoding)):
        digest.update(b"%d:" % len(part))  # length-prefixed: no two triples hash alike
        digest.update(part)
    digest.update(body)
    return digest.hexdigest()[:32]


# Longer than any key a request can make (an 8 KB request line and 8 KB header fields, each
# at most three times longer percent-encoded, a few key headers): parse() refuses more.
MAX_KEY_TEXT: Final = 256 * 1024
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 5.6.2: methods, header names
_DIGEST = re.compile(r"[0-9a-f]{32}")
_KEYED_VALUE = re.compile(r"[0-9A-Za-z_.~%-]*|#[0-9a-f]{16}")  # quote(v, "") or _redact(v)
_BODY = "body="
_ANY_METHOD_AND_UPSTREAM = "* * "  # url_glob's prefix: glob.MAX_EVENT_LENGTH allows for it


@dataclass(frozen=True, slots=True)
class CacheKey:
    """A cache key: `GET yahoo /v8/finance/chart/AAPL?range=5d accept-language=en`, and
    ` body=` and a digest for a cached POST.

    Space-separated fields: spaces cannot occur in an upstream's name, a normalised path or
    query, and header values are percent-encoded (or hashed), so a key always splits back
    into its parts. Its string form (`text`, `str(key)`) is built once, with the key: stores
    are keyed by it, and Redis and the popularity sets hold it, so its grammar never changes.
    Keys are equal when their texts are.
    """

    method: str = field(compare=False, repr=False)
    upstream: str = field(compare=False, repr=False)
    url: str = field(compare=False, repr=False)  # the normalised `path?query`
    # (name, value as keyed: percent-encoded, or hashed for a credential), in config order
    headers: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)
    body: str = field(default="", compare=False, repr=False)  # a cached POST's body digest
    text: str = field(init=False)

    def __post_init__(self) -> None:
        text = f"{self.method} {self.upstream} {self.url}"
        if self.headers:
            text += "".join(f" {name}={value}" for name, value in self.headers)
        if self.body:
            text += f" {_BODY}{self.body}"
        object.__setattr__(self, "text", text)  # frozen: set once, here

    def __str__(self) -> str:
        return self.text

    @classmethod
    def of(
        cls, method: str, upstream: str, target: Target, ignore: frozenset[str],
        secret: frozenset[str],
    ) -> CacheKey:  # fmt: skip
        """The key of a request target, without its header part: the query sorted, ignored
        parameters dropped, secret ones hashed. HEAD shares GET's entries."""
        query = key_query(target, ignore, secret)
        url = f"{target.path}?{query}" if query else target.path
        return cls("GET" if method == "HEAD" else method, upstream, url)

    @classmethod
    def parse(cls, text: str) -> CacheKey:
        """A key from its string form (read back from a store, or given to the admin API);
        ValueError, saying what is wrong, for anything no request could have made.

        A key header named `body` whose value looks like a digest reads back as a body
        part: the text, so the key, is the same."""
        if len(text) > MAX_KEY_TEXT:
            raise ValueError(f"a cache key has at most {MAX_KEY_TEXT} characters")
        if not text.isprintable():
            raise ValueError("a cache key holds no control characters")
        fields = text.split(" ")
        if len(fields) < 3:
            raise ValueError("a cache key is a method, an upstream and a URL: GET api /path")
        method, upstream, url, *rest = fields
        if not _TOKEN.fullmatch(method) or not upstream:
            raise ValueError("a cache key starts with a method and an upstream: GET api /path")
        if not url.startswith("/") or not url.isascii():
            raise ValueError("a cache key's URL is a normalised path, such as /quote/AAPL")
        body = ""
        if rest and rest[-1].startswith(_BODY) and _DIGEST.fullmatch(rest[-1], len(_BODY)):
            body = rest.pop()[len(_BODY) :]
        headers: list[tuple[str, str]] = []
        for part in rest:
            name, eq, value = part.partition("=")
            if not eq or not _TOKEN.fullmatch(name) or not _KEYED_VALUE.fullmatch(value):
                raise ValueError(f"a cache key's header part is name=value, not {part[:40]!r}")
            headers.append((name, value))
        return cls(method, upstream, url, tuple(headers), body)

    def with_headers(self, pairs: Iterable[tuple[str, str]]) -> CacheKey:
        """This key with the key headers' values as the request sent them: percent-encoded,
        and hashed for credential-like headers (Authorization, Cookie, X-Api-Key, ...), since
        keys are shown by the admin API and must never carry a secret."""
        headers = tuple(
            (name, _redact(value) if _secret_header(name) else quote(_utf8(value), ""))
            for name, value in pairs
        )
        if self.headers or self.body:
            return CacheKey(self.method, self.upstream, self.url, headers, self.body)
        return self._extended(headers, "", "".join([f" {n}={v}" for n, v in headers]))

    def with_body(self, content_type: str, coding: str, body: bytes) -> CacheKey:
        """This key for a cached POST's body (see body_digest)."""
        digest = body_digest(content_type, coding, body)
        if self.body:
            return CacheKey(self.method, self.upstream, self.url, self.headers, digest)
        return self._extended(self.headers, digest, f" {_BODY}{digest}")

    def _extended(self, headers: tuple[tuple[str, str], ...], body: str, tail: str) -> CacheKey:
        """What __init__ would make of this key with `tail` appended to its text, for under
        half the cost: key-header routes and cached POSTs build a key on every hit."""
        key, put = object.__new__(CacheKey), object.__setattr__
        put(key, "method", self.method)
        put(key, "upstream", self.upstream)
        put(key, "url", self.url)
        put(key, "headers", headers)
        put(key, "body", body)
        put(key, "text", self.text + tail)
        return key

    @property
    def resource(self) -> str:
        """`upstream path?query`: what every variant of one URL (its key-header variants,
        its cached POST bodies) shares, and what a URL ban names."""
        return f"{self.upstream} {self.url}"

    def get_key(self) -> CacheKey:
        """The plain GET key of the same resource (what an unsafe request invalidates)."""
        return CacheKey("GET", self.upstream, self.url)

    def exact_glob(self) -> str:
        """A glob that matches this key and no other."""
        return escape_glob(self.text)

    def variants_glob(self) -> str:
        """A glob that matches every key-header and body variant of this key's URL, of any
        method, and neither the plain key nor any other URL's keys."""
        return f"* {escape_glob(self.resource)} *"

    @staticmethod
    def variant_resource(text: str) -> str | None:
        """For a key's text with header or body parts, the resource it is a variant of; None
        for a key without them. Cheap, without parsing: bans ask it on every hit."""
        parts = text.split(" ", 3)
        return f"{parts[1]} {parts[2]}" if len(parts) == 4 else None

    @staticmethod
    def url_glob(pattern: str) -> str:
        """A glob over URLs (`/v8/finance/chart/*`, as the admin API takes it) as a glob over
        whole keys; ValueError for one too long to match (glob.bounded)."""
        return "*" if pattern == "*" else _ANY_METHOD_AND_UPSTREAM + bounded(pattern)


def upstream_target(target: Target, extra: Mapping[str, str]) -> str:
    """Path and query to send upstream: the normalised target plus configured parameters.

    Configured parameters replace any the client sent under the same name, so a client can
    neither override nor learn the proxy's credentials.
    """
    pairs = [(n, v) for n, v in target.query if n not in extra] if extra else list(target.query)
    pairs.extend((quote(n, safe=""), "=" + quote(v, safe="")) for n, v in extra.items())
    if not pairs:
        return target.path
    return target.path + "?" + "&".join(name + value for name, value in pairs)


def escape_glob(text: str) -> str:
    """Escape glob metacharacters so `text` matches only itself."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
