"""Request-target checks and cache-key normalisation (pure; no I/O)."""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

from proxy.errors import BadRequest

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


def cache_key(
    method: str,
    upstream: str,
    target: Target,
    ignore: frozenset[str],
    secret: frozenset[str],
    headers: Iterable[tuple[str, str]] = (),
) -> str:
    """`GET yahoo /v8/finance/chart/AAPL?range=5d [accept-language=en]`.

    Space-separated fields: spaces cannot occur in a normalised path or query, and header
    values are percent-encoded, so a key always splits back into its parts. HEAD shares
    GET's entries.
    """
    method = "GET" if method == "HEAD" else method
    query = key_query(target, ignore, secret)
    key = f"{method} {upstream} {target.path}" + (f"?{query}" if query else "")
    return key + header_suffix(headers)


def header_suffix(headers: Iterable[tuple[str, str]]) -> str:
    """The key's header part: ` name=value` per header, values percent-encoded, and hashed
    for credential-like headers (Authorization, Cookie, X-Api-Key, ...): keys are shown by
    the admin API and must never carry a secret."""
    return "".join(
        f" {name}={_redact(value) if _SECRET_NAME.search(name) else quote(_utf8(value), '')}"
        for name, value in headers
    )


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


def key_url(key: str) -> str:
    """The path?query part of a cache key."""
    parts = key.split(" ", 3)
    return parts[2] if len(parts) > 2 else ""


def key_resource(key: str) -> str:
    """The `upstream path?query` of a cache key: what every variant of one URL (its
    key-header variants, its cached POST bodies) shares."""
    return " ".join(key.split(" ", 3)[1:3])


def key_variant_of(key: str) -> str | None:
    """For a key with header or body parts, the `upstream path?query` it is a variant of;
    None for a key without them."""
    parts = key.split(" ", 3)
    return f"{parts[1]} {parts[2]}" if len(parts) == 4 else None


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
