"""Link translation in response bodies (gateway_http.links): forms, boundaries, streaming, codings."""

from __future__ import annotations

import gzip
import hashlib
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import AppConfig
from gateway_http.links import (
    DecompressionBomb,
    LinkMap,
    LinkTranslator,
    TranslationError,
    accept_encoding_for_translation,
    should_translate,
    translator_for_response,
)

PAIRS = [
    ("http://wiki.corp:8080/", "https://wiki.apps.example.test/"),
    ("http://corp/", "https://corp.apps.example.test/"),
    ("http://corp/wiki/", "https://apps.example.test/wiki-ext/"),
    ("https://secure.corp/", "https://secure.apps.example.test:8443/"),
    ("http://[fd00::5]:8000/", "https://v6.apps.example.test/"),
    ("http://star.corp/", "https://*.apps.example.test/"),   # wildcard: no single target
]
MAP = LinkMap.from_pairs(PAIRS)


def oracle(link_map: LinkMap, body: bytes) -> bytes:
    """The plain regex over the whole body: what the anchored, streaming scan must agree with."""
    return link_map.pattern.sub(lambda m: link_map.replacements[m.lastindex - 1], body)


def run(translator: LinkTranslator, pieces) -> bytes:
    return b"".join(translator.feed(p) for p in pieces) + translator.finish()


# -- forms ---------------------------------------------------------------------------------------

TRANSLATED = [
    (b'<a href="http://wiki.corp:8080/a/b?c=1#d">', b'<a href="https://wiki.apps.example.test/a/b?c=1#d">'),
    (b'HTTP://Wiki.Corp:8080/Page', b'https://wiki.apps.example.test/Page'),
    (b'"http://wiki.corp:8080"', b'"https://wiki.apps.example.test"'),
    (b"url(//wiki.corp:8080/s.css)", b"url(//wiki.apps.example.test/s.css)"),
    (b'"http:\\/\\/wiki.corp:8080\\/api"', b'"https:\\/\\/wiki.apps.example.test\\/api"'),
    (b'"\\/\\/wiki.corp:8080\\/api"', b'"\\/\\/wiki.apps.example.test\\/api"'),
    (b"?returnUrl=http%3A%2F%2Fwiki.corp%3A8080%2Fhome&x=1",
     b"?returnUrl=https%3A%2F%2Fwiki.apps.example.test%2Fhome&x=1"),
    (b"?r=http%3a%2f%2fWIKI.corp%3a8080%2fhome", b"?r=https%3A%2F%2Fwiki.apps.example.test%2Fhome"),
    (b"?r=http%3A%2F%2Fwiki.corp%3A8080&x", b"?r=https%3A%2F%2Fwiki.apps.example.test&x"),
    (b"?r=%2F%2Fwiki.corp%3A8080%2Fhome", b"?r=%2F%2Fwiki.apps.example.test%2Fhome"),
    # default port: omitted or written out
    (b"http://corp/x", b"https://corp.apps.example.test/x"),
    (b"http://corp:80/x", b"https://corp.apps.example.test/x"),
    (b"http://corp?q", b"https://corp.apps.example.test?q"),
    (b"https://secure.corp/x", b"https://secure.apps.example.test:8443/x"),
    (b"https://secure.corp:443/x", b"https://secure.apps.example.test:8443/x"),
    (b"http%3A%2F%2Fcorp%3A80%2Fx", b"https%3A%2F%2Fcorp.apps.example.test%2Fx"),
    # the internal path prefix maps to the external one; the most specific app wins
    (b"http://corp/wiki/a", b"https://apps.example.test/wiki-ext/a"),
    (b'"http://corp/wiki"', b'"https://apps.example.test/wiki-ext"'),
    (b"http://corp/wiki?x", b"https://apps.example.test/wiki-ext?x"),
    (b"http://corp/wikipedia", b"https://corp.apps.example.test/wikipedia"),
    (b"http:\\/\\/corp\\/wiki\\/a", b"https:\\/\\/apps.example.test\\/wiki-ext\\/a"),
    (b"http%3A%2F%2Fcorp%2Fwiki%2Fa", b"https%3A%2F%2Fapps.example.test%2Fwiki-ext%2Fa"),
    (b"http%3A%2F%2Fcorp%2Fwiki%3Fa", b"https%3A%2F%2Fapps.example.test%2Fwiki-ext%3Fa"),
    # IPv6 literal
    (b"http://[fd00::5]:8000/x", b"https://v6.apps.example.test/x"),
    (b"http://[FD00::5]:8000/x", b"https://v6.apps.example.test/x"),
    (b"http%3A%2F%2F%5Bfd00%3A%3A5%5D%3A8000%2Fx", b"https%3A%2F%2Fv6.apps.example.test%2Fx"),
    # several in one text
    (b"http://corp/ and http://wiki.corp:8080/", b"https://corp.apps.example.test/ and https://wiki.apps.example.test/"),
]


@pytest.mark.parametrize("body, expected", TRANSLATED)
def test_form_translated(body, expected):
    """Each spelling of an internal URL (plain, scheme-relative, JS-escaped, %-encoded) becomes the external one."""
    assert MAP.translate(body) == expected
    assert oracle(MAP, body) == expected


UNTOUCHED = [
    b"http://wiki.corp.evil/", b"http://wiki.corpx/", b"http://wiki.corp-x:8080/",
    b"http://wiki.corp:9999/", b"http://wiki.corp:80808/", b"http://wiki.corp/",       # other ports
    b"http://wiki.corp:8080@evil.test/", b"http://user@wiki.corp:8080/",               # user info
    b"https://wiki.corp:8080/", b"ftp://wiki.corp:8080/", b"https://corp/",             # other schemes
    b"https:\\/\\/wiki.corp:8080\\/", b"https%3A%2F%2Fwiki.corp%3A8080%2F",
    b"wiki.corp:8080/x", b"see wiki.corp for details", b"corp/wiki/",                  # no scheme, no //
    b"http%3A%2F%2Fwiki.corp%3A9999%2F", b"http%3A%2F%2Fwiki.corp%2Eevil%2F", b"http%3A%2F%2Fcorp%40evil",
    b"http://corp.", b"/wiki/page", b"../x",                                            # relative links
    b"http://star.corp/x",                                                              # wildcard app
    b"http://[fd00::5]/x", b"http://[fd00::55]:8000/x",
]


@pytest.mark.parametrize("body", UNTOUCHED)
def test_near_miss_untouched(body):
    """A longer host, another port, scheme or user info, a bare host or a relative link is left alone."""
    assert MAP.translate(body) == body
    assert oracle(MAP, body) == body


def test_first_app_wins_for_one_internal_url():
    """Two apps publishing one internal URL: links go to the first one's external URL."""
    m = LinkMap.from_pairs([("http://a.corp/", "https://one.test/"), ("http://a.corp/", "https://two.test/")])
    assert m.translate(b"http://a.corp/x") == b"https://one.test/x"


def test_deeper_prefix_wins_whatever_the_order():
    """http://corp/wiki/x goes to the app at /wiki/ whether it is listed before or after the one at /."""
    for pairs in (PAIRS[1:3], PAIRS[2:0:-1]):
        m = LinkMap.from_pairs(pairs)
        assert m.translate(b"http://corp/wiki/x http://corp/y") == \
            b"https://apps.example.test/wiki-ext/x https://corp.apps.example.test/y"


def test_root_internal_under_external_prefix():
    """An app published from / at an external /app/ keeps paths under the prefix, bare origin included."""
    m = LinkMap.from_pairs([("http://corp:8000/", "https://x.test/app/")])
    assert m.translate(b"http://corp:8000/a http://corp:8000?q") == b"https://x.test/app/a https://x.test/app/?q"


def test_from_apps_takes_web_apps_only():
    """from_apps uses every web app's internal and external URL and skips tcp apps and wildcards."""
    apps = [
        AppConfig(name="ssh", listen="tcp:2222", destination="ssh.corp:22", host="ssh.corp", port=22),
        AppConfig(name="wiki", listen="", destination="wiki.corp:8080", host="wiki.corp", port=8080,
                  protocol="http", external_url="https://wiki.apps.example.test/", internal_url="http://wiki.corp:8080/"),
        AppConfig(name="any", listen="", destination="star.corp:80", host="star.corp", port=80,
                  protocol="http", external_url="https://*.apps.example.test/", internal_url="http://star.corp/"),
    ]
    m = LinkMap.from_apps(apps)
    assert m.translate(b"http://wiki.corp:8080/ http://star.corp/ http://ssh.corp:22/") == \
        b"https://wiki.apps.example.test/ http://star.corp/ http://ssh.corp:22/"


def test_empty_map_passes_through():
    """With no web apps the translator holds nothing back and changes nothing."""
    m = LinkMap.from_apps([])
    assert m.empty and m.carry_limit == 0
    t = LinkTranslator(m)
    assert t.feed(b"http://x/") == b"http://x/" and t.finish() == b""


# -- headers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type, content_encoding, expected", [
    (b"text/html", None, True),
    (b"text/html; charset=utf-8", b"gzip", True),
    (b"TEXT/HTML", b"GZIP", True),
    (b"text/css", b"deflate", True),
    (b"application/javascript", b"identity", True),
    (b"text/javascript", b"x-gzip", True),
    (b"application/x-javascript", b"", True),
    (b"application/xhtml+xml", None, True),
    (b"text/html", b"br", False),
    (b"text/html", b"zstd", False),
    (b"text/html", b"gzip, gzip", False),
    (b"text/html", b"gzip, br", False),
    (b"application/json", None, False),
    (b"image/png", None, False),
    (b"text/plain", None, False),
    (None, None, False),
])
def test_should_translate(content_type, content_encoding, expected):
    """HTML, CSS and JavaScript bodies, uncompressed or in one gzip/deflate coding, are translated."""
    assert should_translate(content_type, content_encoding) is expected


def test_should_translate_json_opt_in():
    """JSON is translated only when asked for."""
    assert should_translate(b"application/json", None, json=True)
    assert should_translate(b"application/problem+json; charset=utf-8", b"gzip", json=True)
    assert not should_translate(b"application/json", None)


@pytest.mark.parametrize("value, expected", [
    (b"gzip, deflate, br, zstd", b"gzip, deflate"),
    (b"br;q=1.0, gzip;q=0.8, *;q=0.1", b"gzip;q=0.8"),
    (b"br", b"identity"),
    (None, b"identity"),
    (b"", b"identity"),
    (b"gzip;q=0, br", b"gzip;q=0, identity"),
    (b"br, identity;q=0", b"identity"),
    (b"x-gzip, identity", b"x-gzip, identity"),
    (b"GZIP", b"GZIP"),
])
def test_accept_encoding_for_translation(value, expected):
    """The back end is asked only for codings we can undo, with identity as the fallback."""
    assert accept_encoding_for_translation(value) == expected


# -- streaming -----------------------------------------------------------------------------------

FRAGMENTS = [
    b"http", b"HTTP", b"https", b"://", b":", b"//", b"\\/", b"%3A", b"%3a", b"%2F", b"%2f", b"%2E",
    b"wiki.corp", b"WIKI.Corp", b"corp", b":8080", b":80", b"%3A8080", b"/", b"/wiki", b"wiki", b"x",
    b" ", b'"', b"@", b".", b"?", b"[fd00::5]", b"%5Bfd00%3A%3A5%5D", b"secure.corp", b"<a href=",
    b"http://wiki.corp:8080/", b"http://corp/wiki", b"http:\\/\\/corp\\/", b"http%3A%2F%2Fcorp%2F",
]
bodies = st.lists(st.sampled_from(FRAGMENTS), max_size=60).map(b"".join)


def splits(body: bytes):
    return st.lists(st.integers(0, len(body)), max_size=8).map(
        lambda cuts: [body[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(body)])])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), bodies)
def test_any_split_gives_the_same_output(data, body):
    """However an uncompressed body is cut into pieces, the output equals the whole-body regex's,
    and no more than carry_limit bytes are ever held back."""
    pieces = data.draw(splits(body))
    t = LinkTranslator(MAP)
    out = []
    for piece in pieces:
        out.append(t.feed(piece))
        assert t.carry <= MAP.carry_limit
    out.append(t.finish())
    assert b"".join(out) == oracle(MAP, body) == MAP.translate(body)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), bodies, st.sampled_from([b"gzip", b"deflate"]))
def test_any_split_of_a_compressed_body(data, body, coding):
    """A gzip or deflate body cut anywhere inflates, translates and re-compresses to the same text."""
    compressed = gzip.compress(body) if coding == b"gzip" else zlib.compress(body)
    t = LinkTranslator(MAP, coding)
    out = run(t, data.draw(splits(compressed)))
    decoded = gzip.decompress(out) if coding == b"gzip" else zlib.decompress(out)
    assert decoded == oracle(MAP, body)


def test_one_byte_at_a_time():
    """Feeding a page one byte at a time gives the same page as feeding it whole."""
    body = b"".join(b for b, _ in TRANSLATED) + b"".join(UNTOUCHED)
    expected = b"".join(e for _, e in TRANSLATED) + b"".join(UNTOUCHED)
    assert run(LinkTranslator(MAP), [body[i:i + 1] for i in range(len(body))]) == expected


def test_fifty_mib_in_bounded_memory():
    """A 50 MiB page fed in 64 KiB pieces never holds back more than carry_limit bytes; output is exact."""
    text = b"<p>Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.</p>\n" * 5
    unit = (text + b'<a href="http://wiki.corp:8080/page?id=7">x</a> http://corp.evil/\n' + text
            + b'<script>u="http:\\/\\/corp\\/wiki\\/x"</script>\n')   # about 1 KiB, 2 links, 1 near miss
    translated_unit = MAP.translate(unit)
    assert translated_unit.count(b"https://wiki.apps.example.test/page") == 1
    assert translated_unit.count(b"https:\\/\\/apps.example.test\\/wiki-ext\\/x") == 1
    size, piece = 50 * 1024 * 1024, 64 * 1024
    units = size // len(unit)
    stream = unit * (piece // len(unit) + 2)
    t = LinkTranslator(MAP)
    got, want = hashlib.sha256(), hashlib.sha256()
    fed = 0
    while fed < units * len(unit):
        offset = fed % len(unit)
        data = stream[offset:offset + min(piece, units * len(unit) - fed)]
        out = t.feed(data)
        assert t.carry <= MAP.carry_limit
        # nothing piles up: out is what came in (and the carry) grown by translation, no more
        assert len(out) <= (len(data) + MAP.carry_limit) * len(translated_unit) // len(unit) + len(translated_unit)
        got.update(out)
        fed += len(data)
    got.update(t.finish())
    for _ in range(units):
        want.update(translated_unit)
    assert got.hexdigest() == want.hexdigest()


# -- codings -------------------------------------------------------------------------------------

PAGE = b"".join(b + b"\n" for b, _ in TRANSLATED) * 20
PAGE_OUT = b"".join(e + b"\n" for _, e in TRANSLATED) * 20


@pytest.mark.parametrize("coding, compress, decompress", [
    (b"gzip", gzip.compress, gzip.decompress),
    (b"x-gzip", gzip.compress, gzip.decompress),
    (b"deflate", zlib.compress, zlib.decompress),
    (b"deflate", lambda b: zlib.compress(b, wbits=-15), zlib.decompress),   # raw deflate in, zlib out
])
def test_compressed_round_trip(coding, compress, decompress):
    """gzip, zlib-wrapped and raw deflate bodies come out translated in the same coding (deflate zlib-wrapped)."""
    body = compress(PAGE)
    out = run(LinkTranslator(MAP, coding), [body[i:i + 100] for i in range(0, len(body), 100)])
    assert decompress(out) == PAGE_OUT


def test_each_compressed_feed_is_decodable_at_once():
    """A compressed body is flushed after every feed, so the client can render what came so far."""
    body = gzip.compress(PAGE)
    t = LinkTranslator(MAP, b"gzip")
    client = zlib.decompressobj(16 + zlib.MAX_WBITS)
    seen = client.decompress(t.feed(body[:len(body) // 2]))
    assert len(seen) > 0 and PAGE_OUT.startswith(seen)
    seen += client.decompress(t.feed(body[len(body) // 2:]) + t.finish())
    assert seen == PAGE_OUT and client.eof


def test_multi_member_gzip():
    """A gzip body of several members (concatenated gzip files) is translated as one text."""
    body = gzip.compress(b"<a href='http://wiki.co") + gzip.compress(b"rp:8080/x'>")
    assert gzip.decompress(run(LinkTranslator(MAP, b"gzip"), [body])) == b"<a href='https://wiki.apps.example.test/x'>"


def test_empty_compressed_body_stays_empty():
    """A gzip response with no body bytes yields no bytes."""
    assert run(LinkTranslator(MAP, b"gzip"), []) == b""


def test_decompression_bomb_refused():
    """A small gzip body that inflates far beyond MAX_RATIO raises DecompressionBomb, without inflating it all."""
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), 9)
    assert len(bomb) < 128 * 1024
    t = LinkTranslator(MAP, b"gzip")
    with pytest.raises(DecompressionBomb, match="times its size"):
        for i in range(0, len(bomb), 4096):
            t.feed(bomb[i:i + 4096])
    assert t._inflated <= 2 * 1024 * 1024   # stopped early: about the allowance plus one piece


def test_ratio_is_a_parameter():
    """A text more compressible than the guard allows passes with a higher max_ratio."""
    body = gzip.compress(b"http://corp/ " + b" " * (4 * 1024 * 1024))
    with pytest.raises(DecompressionBomb):
        run(LinkTranslator(MAP, b"gzip"), [body])
    out = run(LinkTranslator(MAP, b"gzip", max_ratio=10_000), [body])
    assert gzip.decompress(out).startswith(b"https://corp.apps.example.test/ ")


def test_corrupt_body_is_a_translation_error():
    """Bytes that are not gzip raise TranslationError naming the coding."""
    with pytest.raises(TranslationError, match="gzip body is corrupt"):
        run(LinkTranslator(MAP, b"gzip"), [b"this is not gzip at all"])


def test_truncated_body_is_a_translation_error():
    """A gzip body cut short raises TranslationError at finish, so the front door can abort the response."""
    body = gzip.compress(PAGE)
    t = LinkTranslator(MAP, b"gzip")
    t.feed(body[:-10])
    with pytest.raises(TranslationError, match="ended before"):
        t.finish()


def test_data_after_deflate_end_is_an_error():
    """Bytes after the end of a deflate stream are refused rather than silently dropped."""
    with pytest.raises(TranslationError, match="after the end"):
        run(LinkTranslator(MAP, b"deflate"), [zlib.compress(b"abc") + b"junk"])


def test_unsupported_coding_refused():
    """A translator for a coding should_translate refuses raises ValueError at once."""
    with pytest.raises(ValueError, match="should_translate"):
        LinkTranslator(MAP, b"br")


def test_feed_after_finish_refused():
    """feed after finish is a programming error, not silently ignored."""
    t = LinkTranslator(MAP)
    t.finish()
    with pytest.raises(RuntimeError):
        t.feed(b"x")


# -- per response --------------------------------------------------------------------------------

HEADERS = [(b"Content-Type", b"text/html; charset=utf-8"), (b"Content-Encoding", b"gzip"),
           (b"Content-Length", b"1234"), (b"ETag", b'"abc"'), (b"Accept-Ranges", b"bytes"),
           (b"Content-MD5", b"Q2hlY2sgSW50ZWdyaXR5IQ=="), (b"Cache-Control", b"no-cache")]


def test_translator_for_a_page():
    """A gzip HTML 200 gets a gzip translator; length, ranges and digests go, the ETag turns weak."""
    translator, headers = translator_for_response(MAP, b"GET", 200, HEADERS)
    assert translator is not None and translator.coding == b"gzip"
    assert headers == [(b"Content-Type", b"text/html; charset=utf-8"), (b"Content-Encoding", b"gzip"),
                       (b"ETag", b'W/"abc"'), (b"Cache-Control", b"no-cache")]


@pytest.mark.parametrize("method, status, extra", [
    (b"HEAD", 200, []), (b"GET", 304, []), (b"GET", 204, []), (b"GET", 101, []),
    (b"GET", 206, []), (b"GET", 200, [(b"Content-Range", b"bytes 0-9/100")]),
])
def test_no_translator_without_a_whole_body(method, status, extra):
    """HEAD, 1xx, 204, 304 and partial responses pass through untouched, headers unchanged."""
    assert translator_for_response(MAP, method, status, HEADERS + extra) == (None, HEADERS + extra)


def test_no_translator_for_other_types_or_without_apps():
    """An image, a brotli page or a map without web apps gets no translator."""
    image = [(b"Content-Type", b"image/png"), (b"Content-Length", b"10")]
    brotli = [(b"Content-Type", b"text/html"), (b"Content-Encoding", b"br")]
    assert translator_for_response(MAP, b"GET", 200, image) == (None, image)
    assert translator_for_response(MAP, b"GET", 200, brotli) == (None, brotli)
    assert translator_for_response(LinkMap.from_apps([]), b"GET", 200, HEADERS)[0] is None
    json = [(b"Content-Type", b"application/json")]
    assert translator_for_response(MAP, b"GET", 200, json)[0] is None
    assert translator_for_response(MAP, b"GET", 200, json, json=True)[0] is not None


@pytest.mark.parametrize("pair", [p for p in PAIRS if "*" not in p[1]])
def test_every_two_piece_split_with_a_tight_carry(pair):
    """With one app (so carry_limit is that app's longest form), every cut of every example body
    into two pieces gives the whole-body output: the carry is long enough, not just generous."""
    link_map = LinkMap.from_pairs([pair])
    for body in [b for b, _ in TRANSLATED] + UNTOUCHED:
        want = oracle(link_map, body)
        for k in range(len(body) + 1):
            assert run(LinkTranslator(link_map), [body[:k], body[k:]]) == want, (body, k)
