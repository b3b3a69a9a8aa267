"""proxy/keys.py: request-target checks, normalisation and cache keys (pure)."""

from __future__ import annotations

import pytest

from proxy.errors import BadRequest
from proxy.glob import MAX_EVENT_LENGTH, MAX_LENGTH, Glob
from proxy.keys import (
    CacheKey,
    body_digest,
    escape_glob,
    is_secret_param,
    key_query,
    parse_target,
    upstream_target,
)

IGNORE = frozenset({"_", "crumb"})
SECRET = frozenset({"apikey", "token"})


def key(url: str, method: str = "GET", headers: tuple[tuple[str, str], ...] = ()) -> str:
    return CacheKey.of(method, "api", parse_target(url), IGNORE, SECRET).with_headers(headers).text


# --- parse_target: refusals ----------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        # absolute-form and authority-form: never an open proxy
        "http://evil.example/x",
        "https://evil.example/x",
        "evil.example:443",
        "//evil.example/x",
        "//evil.example",
        "",
        "*",
        # dot segments, in every encoding
        "/..",
        "/a/..",
        "/a/../b",
        "/a/./b",
        "/.",
        "/a/%2e%2e/b",
        "/a/%2E%2E/b",
        "/a/.%2E/b",
        "/a/%2e./b",
        "/a/%2e/b",
        "/%2E%2E%2Fx",
        "/a%2F..%2Fb",
        "/a%2f.%2fb",
        "/v8/finance/chart/..%2F..%2Fadmin",
        # backslashes and control characters, raw or encoded
        "/a\\b",
        "/a%5Cb",
        "/a%5c..%5cb",
        "/a%00b",
        "/a\x00b",
        "/a%0Ab",
        "/a%0d%0aSet-Cookie:x",
        "/a%09b",
        "/a%7Fb",
        "/a\x7fb",
    ],
)
def test_parse_target_refuses(raw: str) -> None:
    with pytest.raises(BadRequest):
        parse_target(raw)


@pytest.mark.parametrize(
    "raw",
    ["/", "/a/.hidden", "/a/...", "/a/..b", "/a/b..", "/v8/finance/chart/BRK.B", "/a?x=../y"],
)
def test_parse_target_accepts_dots_that_are_not_segments(raw: str) -> None:
    assert parse_target(raw).path.startswith("/")


# --- parse_target: normalisation -----------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("/v8/finance/chart/%41APL", "/v8/finance/chart/AAPL"),
        ("/a%2fb", "/a%2Fb"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/caf%C3%A9", "/café"),
        ("/%5EGSPC", "/^GSPC"),
        ("/%5eGSPC", "/^GSPC"),
        ("/%7Euser", "/~user"),
        ("/a%20b", "/a b"),
        ("/x?q=a+b", "/x?q=a%20b"),
        ("/x?q=%5E", "/x?q=^"),
        ("/x?q=%5e", "/x?q=^"),
        ("/x?q=%7e", "/x?q=~"),
        ("/x?q=%2f", "/x?q=/"),
        ("/x?%71=1", "/x?q=1"),
        ("/x?a=1&&b=2", "/x?a=1&b=2"),
        ("/x?a=1#frag", "/x?a=1"),
        ("/x#frag", "/x"),
    ],
)
def test_equivalent_targets_normalise_equal(a: str, b: str) -> None:
    assert parse_target(a) == parse_target(b)
    assert key(a) == key(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("/a%2Fb", "/a/b"),  # an encoded slash is data, not a separator
        ("/x?q=a%2Bb", "/x?q=a+b"),  # '+' means space in a query, '%2B' means plus
        ("/x?q=a%26b", "/x?q=a&b"),
        ("/A", "/a"),
        ("/x/", "/x"),
    ],
)
def test_distinct_targets_stay_distinct(a: str, b: str) -> None:
    assert parse_target(a) != parse_target(b)


def test_parse_target_decodes_params_for_route_conditions() -> None:
    target = parse_target("/x?range=5d&q=a+b%21&range=1mo&sym=%5EGSPC")
    assert target.params == {"range": "5d", "q": "a b!", "sym": "^GSPC"}  # first value wins
    assert target.query == (
        ("range", "=5d"),
        ("q", "=a%20b!"),
        ("range", "=1mo"),
        ("sym", "=%5EGSPC"),
    )


# --- CacheKey.of and with_headers: the key's shape -----------------------------------------


def test_key_shape() -> None:
    assert key("/v8/finance/chart/AAPL?range=5d") == "GET api /v8/finance/chart/AAPL?range=5d"
    assert key("/v8/finance/chart/AAPL") == "GET api /v8/finance/chart/AAPL"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("/x?b=2&a=1", "/x?a=1&b=2"),
        ("/x?c=3&a=1&b=2", "/x?b=2&c=3&a=1"),
        ("/x?a=1&_=1700000000", "/x?a=1"),
        ("/x?_=1&a=1&crumb=zzz", "/x?a=1"),
        ("/x?_=1", "/x"),
        ("/x?s=A&t=1&s=B", "/x?t=1&s=A&s=B"),  # repeats keep their relative order
    ],
)
def test_keys_equal(a: str, b: str) -> None:
    assert key(a) == key(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("/x?s=B&s=A", "/x?s=A&s=B"),  # repeated params keep their order
        ("/x?a=1&b=2", "/x?a=1%26b%3D2"),
        ("/x?a=", "/x?a"),
        ("/x?a=1", "/x?a=2"),
        ("/x?a=1", "/x"),
        ("/x?a%3D1=2", "/x?a=1%3D2"),
        ("/x?q=a%2Bb", "/x?q=a+b"),
        ("/a%2Fb", "/a/b"),
        ("/a%3Fb=1", "/a?b=1"),
        ("/x?a=1&a=1", "/x?a=1"),
        ("/x?a=%20", "/x?a="),
    ],
)
def test_different_urls_never_collide(a: str, b: str) -> None:
    assert key(a) != key(b)


def test_head_shares_get_entries_and_other_methods_do_not() -> None:
    assert key("/x?a=1", "HEAD") == key("/x?a=1", "GET")
    assert key("/x?a=1", "POST") != key("/x?a=1", "GET")


def test_headers_are_part_of_the_key() -> None:
    plain = key("/x")
    english = key("/x", headers=(("accept-language", "en"),))
    german = key("/x", headers=(("accept-language", "de"),))
    assert len({plain, english, german}) == 3
    assert english == "GET api /x accept-language=en"
    # values are percent-encoded, so a header value cannot forge another field
    spaced = key("/x", headers=(("accept-language", "en x=1"),))
    assert spaced == "GET api /x accept-language=en%20x%3D1"
    assert spaced != key("/x", headers=(("accept-language", "en"), ("x", "1")))


def test_upstreams_separate_keys() -> None:
    target = parse_target("/x")
    assert CacheKey.of("GET", "a", target, IGNORE, SECRET) != CacheKey.of(
        "GET", "b", target, IGNORE, SECRET
    )


@pytest.mark.parametrize(
    "url",
    [
        "/x?apikey=SUPERSECRET123&a=1",
        "/x?token=SUPERSECRET123",
        "/x?api%6Bey=SUPERSECRET123",
        "/x?apikey=SUPER%53ECRET123",
        "/x?a=1&apikey=SUPERSECRET123&apikey=SUPERSECRET123",
    ],
)
def test_secret_values_never_appear_in_the_key(url: str) -> None:
    k = key(url)
    assert "SUPERSECRET123" not in k
    assert "SUPER%53ECRET123" not in k
    assert "=#" in k  # replaced by a hash


def test_different_secrets_give_different_keys() -> None:
    assert key("/x?apikey=one") != key("/x?apikey=two")
    assert key("/x?apikey=one") == key("/x?apikey=one")
    # a client cannot forge the hashed form by sending it as a plain value
    hashed = key("/x?apikey=one").split("apikey=")[1]
    assert key(f"/x?apikey={hashed}") != key("/x?apikey=one")


def test_key_query_drops_ignored_and_sorts() -> None:
    target = parse_target("/x?z=1&_=2&a=3")
    assert key_query(target, frozenset({"_"}), frozenset()) == "a=3&z=1"
    assert key_query(target, frozenset(), frozenset()) == "_=2&a=3&z=1"


@pytest.mark.parametrize(
    ("k", "url"),
    [
        ("GET api /v8/finance/chart/AAPL?range=5d", "/v8/finance/chart/AAPL?range=5d"),
        ("GET api /x accept-language=en", "/x"),
        ("GET api /x?a=1 h=v h2=v2", "/x?a=1"),
    ],
)
def test_cache_key_url(k: str, url: str) -> None:
    assert CacheKey.parse(k).url == url


# --- upstream_target -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "extra", "expected"),
    [
        ("/x", {}, "/x"),
        ("/x?a=1&b=2", {}, "/x?a=1&b=2"),
        ("/x", {"apikey": "K"}, "/x?apikey=K"),
        ("/x?a=1", {"apikey": "K"}, "/x?a=1&apikey=K"),
        ("/x?apikey=mine&a=1", {"apikey": "K"}, "/x?a=1&apikey=K"),
        ("/x?apikey=a&apikey=b", {"apikey": "K"}, "/x?apikey=K"),
        ("/x?api%6Bey=mine", {"apikey": "K"}, "/x?apikey=K"),
        ("/x", {"k": "a b&c=d"}, "/x?k=a%20b%26c%3Dd"),
        ("/x?q=a+b", {}, "/x?q=a%20b"),
    ],
)
def test_upstream_target_adds_configured_params(
    url: str, extra: dict[str, str], expected: str
) -> None:
    assert upstream_target(parse_target(url), extra) == expected


# --- escaping for globs (matching: tests/test_glob.py) --------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "GET api /x?a=1",
        "GET api /v8/finance/chart/%5EGSPC?range=5d",
        "a*b?c[d]e\\f",
        "[abc]",
        "*",
        "?",
        "\\",
    ],
)
def test_escape_glob_matches_only_itself(text: str) -> None:
    glob = Glob.parse(escape_glob(text))
    assert glob.matches(text)
    assert not glob.matches(text + "x")
    assert not glob.matches("x" + text)
    if len(text) > 1:
        assert not glob.matches(text[:-1] + "Z")


def test_escaped_key_plus_wildcard_matches_its_header_variants_only() -> None:
    exact = key("/x?a=1")
    glob = Glob.parse(escape_glob(exact) + " *")
    assert glob.matches(key("/x?a=1", headers=(("accept-language", "en"),)))
    assert not glob.matches(exact)
    assert not glob.matches(key("/x?a=12", headers=(("accept-language", "en"),)))


# --- found by tests/test_fuzz.py ------------------------------------------------------------


@pytest.mark.parametrize("raw", ["/\udcff", "/a?b=\udcff", "/\ud800"])
def test_a_target_that_is_not_utf8_is_a_bad_request(raw: str) -> None:
    # aiohttp decodes the request line with surrogateescape: a raw 0xFF byte is "\udcff".
    # This raised UnicodeEncodeError (a 500) before.
    with pytest.raises(BadRequest):
        parse_target(raw)


def test_a_key_header_that_is_not_utf8_still_makes_a_key() -> None:
    # A raw 0xFF byte in Accept-Language (a key header) reached the key's header part as "\udcff"
    # and raised UnicodeEncodeError: the proxy answered 500.
    raw = key("/x", headers=(("accept-language", "\udcff"),))
    assert raw == "GET api /x accept-language=%ED%B3%BF"
    assert raw != key("/x", headers=(("accept-language", "\udcfe"),))
    secret = key("/x", headers=(("authorization", "\udcff"),))
    assert secret.startswith("GET api /x authorization=#")


def test_configured_names_match_whatever_percent_encoding_does_to_them() -> None:
    # Names were compared in their encoded form: `secret_params: ["auth[token]"]` never
    # matched `auth%5Btoken%5D`, so the credential went into the key in clear.
    target = parse_target("/q?auth%5Btoken%5D=s3cr3tvalue&a+b=1&range=5d")
    query = key_query(target, frozenset({"a b"}), frozenset({"auth[token]"}))
    assert "s3cr3tvalue" not in query
    assert query.startswith("auth%5Btoken%5D=#") and query.endswith("&range=5d")


# --- issue 11 ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "/%C0%AE%C0%AE%C0%AF",  # overlong "../": a lax UTF-8 decoder upstream walks up
        "/quote/%C0%AE%C0%AE%C0%AFadmin",
        "/a/%c0%ae%c0%ae/b",
        "/a/%E0%80%AE%E0%80%AE/b",  # three-byte overlong dots
        "/a%C0%AFb",  # overlong "/"
        "/%FF",
        "/%C3",  # truncated sequence
        "/%ED%A0%80",  # an encoded surrogate (CESU-8)
        "/%F4%90%80%80",  # beyond U+10FFFF
    ],
)
def test_a_path_that_is_not_utf8_once_decoded_is_a_bad_request(raw: str) -> None:
    """Issue 11 #13: percent-decoded bytes must be valid UTF-8 (no overlong forms)."""
    with pytest.raises(BadRequest, match="UTF-8"):
        parse_target(raw)


@pytest.mark.parametrize("raw", ["/caf%C3%A9", "/%E2%82%AC", "/%F0%9F%98%80", "/x?q=%C0%AE%FF"])
def test_utf8_paths_and_any_query_bytes_are_accepted(raw: str) -> None:
    # Query values are data, percent-encoded upstream as they came: legacy clients send
    # Latin-1 forms (`q=caf%E9`). Only the path is resolved by the upstream.
    assert parse_target(raw).path.startswith("/")


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        # issue 11 #12: these stayed in clear
        ("api_token", True), ("access_key", True), ("APIKEY", True),
        ("apikey", True), ("api_key", True), ("apiKey", True), ("key", True), ("token", True),
        ("access_token", True), ("refresh_token", True), ("secret", True),
        ("client_secret", True), ("password", True), ("passwd", True), ("pwd", True),
        ("signature", True), ("X-Amz-Signature", True), ("sig", True), ("hmac_sig", True),
        ("auth", True), ("oauth_nonce", True), ("Authorization", True), ("session_id", True),
        ("credentials", True), ("X-Goog-Credential", True),
        # review of issue 11: these stayed in clear too
        ("pass", True), ("pw", True), ("jwt", True), ("otp", True), ("bearer", True),
        ("Client_ID", True),  # configured below, in another case
        ("api%5Btoken%5D", True),  # `api[token]`, as a normalised query spells it
        # harmless false positives: only hidden from listings, still keyed
        ("monkey", True), ("design", True), ("author", True), ("compass", True),
        # everyday names stay readable
        ("range", False), ("interval", False), ("symbol", False), ("symbols", False),
        ("q", False), ("lang", False), ("region", False), ("fields", False),
        ("period1", False), ("crumb", False), ("client_name", False),
    ],
)  # fmt: skip
def test_secret_parameters_by_pattern_and_configured_name(name: str, secret: bool) -> None:
    configured = frozenset({"client_id"})
    query = key_query(parse_target(f"/x?{name}=VALUE123"), frozenset(), configured)
    assert ("VALUE123" not in query) is secret, query
    assert is_secret_param(name, configured) is secret


def test_hashed_parameters_still_key_apart() -> None:
    # A false positive only hides the value: distinct values keep distinct keys.
    for name in ("monkey", "api_token", "Signature"):
        assert key(f"/x?{name}=a") != key(f"/x?{name}=b")
        assert key(f"/x?{name}=a") == key(f"/x?{name}=a")
        assert key(f"/x?{name}=a") != key(f"/x?{name}a=a")


def test_configured_secret_names_match_case_insensitively() -> None:
    query = key_query(parse_target("/x?CID=VALUE123&cid=OTHER456"), frozenset(), frozenset({"Cid"}))
    assert "VALUE123" not in query and "OTHER456" not in query


def test_body_digest_covers_every_header_that_says_how_to_read_the_body() -> None:
    """Issue 11 #8: the full Content-Type (charset, boundary) and Content-Encoding go
    upstream with the body, so they are all part of the key."""
    body = b'{"s": ["AAPL"]}'
    digests = {
        body_digest("application/json", "", body),
        body_digest("application/json; charset=utf-16", "", body),
        body_digest("application/json", "gzip", body),
        body_digest("application/json; charset=utf-16", "gzip", body),
        body_digest("multipart/form-data; boundary=a", "", body),
        body_digest("multipart/form-data; boundary=b", "", body),
        body_digest("", "", body),
        # no field can be shifted into another: `a` + `b:` is not `a:b` + ``
        body_digest("a", "b", b""),
        body_digest("ab", "", b""),
        body_digest("", "ab", b""),
        body_digest("a", "", b"b"),
    }
    assert len(digests) == 11
    assert body_digest("application/json", "", body) == body_digest("application/json", "", body)


# --- CacheKey: the key as a value ----------------------------------------------------------

DIGEST = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    ("text", "method", "upstream", "url", "headers", "body"),
    [
        ("GET api /x", "GET", "api", "/x", (), ""),
        ("GET yahoo /v8/finance/chart/AAPL?range=5d", "GET", "yahoo",
         "/v8/finance/chart/AAPL?range=5d", (), ""),
        ("GET api /x?a&b=&c=1", "GET", "api", "/x?a&b=&c=1", (), ""),
        ("GET api /x accept-language=en", "GET", "api", "/x", (("accept-language", "en"),), ""),
        ("GET api /x?q=1 accept-language=en%20x%3D1 x-region=eu", "GET", "api", "/x?q=1",
         (("accept-language", "en%20x%3D1"), ("x-region", "eu")), ""),
        ("GET api /x authorization=#0123456789abcdef", "GET", "api", "/x",
         (("authorization", "#0123456789abcdef"),), ""),
        ("GET api /x accept-language=", "GET", "api", "/x", (("accept-language", ""),), ""),
        (f"POST api /xhr/ncp body={DIGEST}", "POST", "api", "/xhr/ncp", (), DIGEST),
        (f"POST api /q?a=1 x-region=eu body={DIGEST}", "POST", "api", "/q?a=1",
         (("x-region", "eu"),), DIGEST),
        # glob metacharacters, sub-delims and percent-encodings are all kept as they are
        ("GET api /a*b?c=[d]&e=%5C!$'()*,;:@/? x=%ED%B3%BF", "GET", "api",
         "/a*b?c=[d]&e=%5C!$'()*,;:@/?", (("x", "%ED%B3%BF"),), ""),
        ("GET api.v2_eu-1 /", "GET", "api.v2_eu-1", "/", (), ""),
        ("GET börse /x", "GET", "börse", "/x", (), ""),  # an upstream's name is the config's
        ("DELETE api /x", "DELETE", "api", "/x", (), ""),
        ("GET api /x body=abc", "GET", "api", "/x", (("body", "abc"),), ""),  # not a digest
    ],
)  # fmt: skip
def test_a_key_reads_back_into_its_parts_and_writes_the_same_text(
    text: str, method: str, upstream: str, url: str, headers: tuple[tuple[str, str], ...],
    body: str,
) -> None:  # fmt: skip
    parsed = CacheKey.parse(text)
    assert (parsed.method, parsed.upstream, parsed.url, parsed.headers, parsed.body) == (
        method, upstream, url, headers, body,
    )  # fmt: skip
    assert parsed.text == str(parsed) == text
    built = CacheKey(method, upstream, url, headers, body)
    assert built == parsed and hash(built) == hash(parsed)
    assert CacheKey.parse(str(built)) == built
    assert parsed.resource == f"{upstream} {url}"
    assert CacheKey.variant_resource(text) == (parsed.resource if headers or body else None)


@pytest.mark.parametrize(
    ("url", "method", "headers", "body"),
    [
        ("/x", "GET", (), None),
        ("/x", "HEAD", (), None),
        ("/v8/finance/chart/%5EGSPC?range=5d&_=1", "GET", (("accept-language", "de-CH"),), None),
        ("/q?apikey=SECRET&a=1", "GET", (("authorization", "Bearer t"), ("x-r", "a b")), None),
        ("/x?q=a+b&q=%2B", "POST", (), b'{"s": 1}'),
        ("/x", "POST", (("cookie", "\udcff"), ("accept-language", "=&? ")), b""),
        ("/caf%C3%A9/*[a]?b=\\", "GET", (("x", "\x7f"),), None),
    ],
)
def test_every_key_a_request_makes_reads_back_as_itself(
    url: str, method: str, headers: tuple[tuple[str, str], ...], body: bytes | None
) -> None:
    made = CacheKey.of(method, "api", parse_target(url), IGNORE, SECRET).with_headers(headers)
    if body is not None:
        made = made.with_body("application/json", "", body)
    parsed = CacheKey.parse(made.text)
    assert parsed == made
    assert (parsed.method, parsed.url, parsed.headers, parsed.body) == (
        made.method, made.url, made.headers, made.body,
    )  # fmt: skip
    assert "SECRET" not in made.text and "Bearer" not in made.text


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "a method, an upstream and a URL"),
        ("garbage", "a method, an upstream and a URL"),
        ("GET api", "a method, an upstream and a URL"),
        ("GET  /x", "starts with a method and an upstream"),  # no upstream
        ("G(T api /x", "starts with a method and an upstream"),
        (" api /x", "starts with a method and an upstream"),
        ("GET api x", "normalised path"),
        ("GET api ", "normalised path"),
        ("GET api /é", "normalised path"),
        ("GET api /x\n", "control characters"),
        ("GET api /x\x00y", "control characters"),
        ("GET\tapi /x", "control characters"),
        ("GET api /\udcff", "control characters"),  # a lone surrogate
        ("GET api /x ", "header part"),  # an empty part
        ("GET api /x  h=v", "header part"),
        ("GET api /x h", "header part"),
        ("GET api /x =v", "header part"),
        ("GET api /x h:1=v", "header part"),
        ("GET api /x h=v=w", "header part"),  # keyed values are percent-encoded
        ("GET api /x h=é", "header part"),
        ("GET api /x authorization=#secret", "header part"),
        ("GET api /x " + "h=v " * 10 + "h", "header part"),
        ("GET api /" + "a" * 300_000, "at most"),
    ],
)
def test_parse_refuses_what_no_request_makes(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        CacheKey.parse(text)


def test_the_variants_glob_matches_every_variant_of_its_url_and_nothing_else() -> None:
    for url in ("/x?a=1", "/a*b?c=[d]", "/x\\y?"):
        base = CacheKey("GET", "api", url)
        glob = Glob.parse(base.variants_glob())
        variants = [
            base.with_headers([("accept-language", "en")]),
            base.with_headers([("accept-language", "en"), ("x-region", "eu")]),
            base.with_body("application/json", "", b"{}"),
            CacheKey("POST", "api", url).with_body("", "", b"x"),
            CacheKey("POST", "api", url, (("x", "1"),)).with_body("", "", b"x"),
        ]
        others = [
            base,  # the plain key is not a variant (it is deleted by name)
            CacheKey("POST", "api", url),
            CacheKey("GET", "api", url + "2", (("accept-language", "en"),)),
            CacheKey("GET", "api", url[:-1], (("accept-language", "en"),)),
            CacheKey("GET", "api", url + "&b=1", (("accept-language", "en"),)),
            CacheKey("GET", "api2", url, (("accept-language", "en"),)),
            CacheKey("GET", "ap", url, (("accept-language", "en"),)),
            CacheKey("GET", "api", "/y", (("accept-language", "en"),)),
        ]
        assert all(glob.matches(v.text) for v in variants), url
        assert not any(glob.matches(o.text) for o in others), url
        assert {CacheKey.variant_resource(v.text) for v in variants} == {base.resource}


def test_the_exact_glob_matches_only_its_key() -> None:
    key_ = CacheKey("GET", "api", "/a*b?c=[d]", (("x", "1"),))
    glob = Glob.parse(key_.exact_glob())
    assert glob.matches(key_.text)
    assert not glob.matches(CacheKey("GET", "api", "/axb?c=d", (("x", "1"),)).text)
    assert not glob.matches(CacheKey("GET", "api", "/a*b?c=[d]").text)


def test_get_key_is_the_plain_get_key_of_the_same_resource() -> None:
    posted = CacheKey("POST", "api", "/x?a=1", (("x", "1"),)).with_body("", "", b"b")
    assert posted.get_key().text == "GET api /x?a=1"
    assert posted.get_key().resource == posted.resource == "api /x?a=1"


def test_a_text_is_built_once_and_keys_compare_by_it() -> None:
    made = CacheKey("GET", "api", "/x")
    assert str(made) is made.text
    assert repr(made) == "CacheKey(text='GET api /x')"
    # A key header named `body` with a digest-like value writes what a body part writes:
    # the same key, whichever way it was built.
    header = CacheKey("GET", "api", "/x", (("body", DIGEST),))
    assert header == CacheKey("GET", "api", "/x", (), DIGEST)
    assert CacheKey("GET", "api", "/x") != CacheKey("GET", "api", "/x", (("h", ""),))


def test_url_globs_cover_whole_keys_within_the_length_other_instances_take() -> None:
    assert CacheKey.url_glob("*") == "*"
    glob = CacheKey.url_glob("/v8/finance/chart/*")
    assert Glob.parse(glob).matches("GET yahoo /v8/finance/chart/AAPL?range=5d x=1")
    assert not Glob.parse(glob).matches("GET yahoo /quote/AAPL")
    longest = CacheKey.url_glob("/" + "*" * (MAX_LENGTH - 1))
    assert len(longest) == MAX_EVENT_LENGTH  # glob.py allows for exactly this prefix
    with pytest.raises(ValueError, match="at most"):
        CacheKey.url_glob("/" + "*" * MAX_LENGTH)


def test_with_headers_and_with_body_replace_what_the_key_had() -> None:
    posted = CacheKey("POST", "api", "/x", (("h", "old"),), DIGEST)
    assert posted.with_headers([("h", "new v")]).text == f"POST api /x h=new%20v body={DIGEST}"
    assert posted.with_headers([]).text == f"POST api /x body={DIGEST}"
    other = posted.with_body("", "", b"other")
    assert other.text == f"POST api /x h=old body={body_digest('', '', b'other')}"
    # Built by appending to the text (the hit path's way) or whole, the same key.
    appended = CacheKey("GET", "api", "/x").with_headers([("h", "v")]).with_body("", "", b"b")
    whole = CacheKey("GET", "api", "/x", (("h", "v"),), body_digest("", "", b"b"))
    assert (appended.method, appended.upstream, appended.url, appended.headers, appended.body,
            appended.text) == (whole.method, whole.upstream, whole.url, whole.headers,
            whole.body, whole.text)  # fmt: skip
