"""The http plugin's pure rules: parsing, routing by host, header translation, chunked framing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from attrs import frozen

from gateway_http import rules
from gateway_http.rules import ChunkDecoder, HTTPError, Origin

EXTERNAL = Origin("http", "wiki.apps.example.test", 8080)
INTERNAL = Origin("http", "wiki.corp", 8000)


@frozen
class App:
    name: str
    external_url: str


def req(head: bytes) -> rules.Request:
    return rules.parse_request_head(head)


# -- parsing -------------------------------------------------------------------------------


def test_request_head_is_parsed():
    """Method, target, version and headers (names as sent, values trimmed) come out of a head."""
    r = req(b"GET /a?b=1 HTTP/1.1\r\nHost: wiki\r\nX-A:  1 \r\nX-A: 2")
    assert (r.method, r.target, r.version) == (b"GET", b"/a?b=1", b"HTTP/1.1")
    assert r.headers == [(b"Host", b"wiki"), (b"X-A", b"1"), (b"X-A", b"2")]


@pytest.mark.parametrize("head, status", [
    (b"GET /\r\nHost: a", 400),
    (b"GET / HTTP/2.0\r\nHost: a", 505),
    (b"GET / FTP/1.0\r\nHost: a", 400),
    (b"GET / HTTP/1.1\r\n folded: x", 400),
    (b"GET / HTTP/1.1\r\nBad Name: x", 400),
    (b"GET / HTTP/1.1\r\nNoColon", 400),
    (b"GET /" + b"a" * rules.MAX_REQUEST_LINE + b" HTTP/1.1\r\nHost: a", 414),
    (b"GET / HTTP/1.1\r\n" + b"\r\n".join(b"X-%d: 1" % i for i in range(rules.MAX_HEADERS + 1)), 431),
])
def test_malformed_requests_are_refused(head, status):
    """Malformed request lines and fields, too long lines and too many fields get the right status."""
    with pytest.raises(HTTPError) as e:
        req(head)
    assert e.value.status == status


@pytest.mark.parametrize("headers, expected", [
    (b"", 0),
    (b"\r\nContent-Length: 12", 12),
    (b"\r\nContent-Length: 12\r\nContent-Length: 12", 12),
    (b"\r\nTransfer-Encoding: chunked", None),
])
def test_request_body_framing(headers, expected):
    """Content-Length gives a length, chunked gives None, nothing gives 0."""
    assert rules.request_body_length(req(b"POST / HTTP/1.1\r\nHost: a" + headers)) == expected


@pytest.mark.parametrize("headers, status", [
    (b"\r\nContent-Length: 1\r\nContent-Length: 2", 400),
    (b"\r\nContent-Length: -1", 400),
    (b"\r\nContent-Length: 1\r\nTransfer-Encoding: chunked", 400),
    (b"\r\nTransfer-Encoding: gzip, chunked", 501),
])
def test_ambiguous_request_framing_is_refused(headers, status):
    """Conflicting lengths, length plus chunked (request smuggling) and unknown codings are refused."""
    with pytest.raises(HTTPError) as e:
        rules.request_body_length(req(b"POST / HTTP/1.1\r\nHost: a" + headers))
    assert e.value.status == status


@pytest.mark.parametrize("status, method, headers, expected", [
    (200, b"GET", [(b"Content-Length", b"5")], 5),
    (200, b"HEAD", [(b"Content-Length", b"5")], 0),
    (204, b"GET", [], 0),
    (304, b"GET", [(b"Content-Length", b"5")], 0),
    (200, b"GET", [(b"Transfer-Encoding", b"chunked")], None),
    (200, b"GET", [], -1),
])
def test_response_body_framing(status, method, headers, expected):
    """HEAD, 204 and 304 have no body; chunked is None; no length means until the back end closes."""
    response = rules.Response(b"HTTP/1.1", status, b"X", headers)
    assert rules.response_body_length(response, method) == expected


def test_keep_alive_rules():
    """HTTP/1.1 keeps the connection unless Connection: close; HTTP/1.0 never does."""
    assert rules.wants_keep_alive(req(b"GET / HTTP/1.1\r\nHost: a"))
    assert not rules.wants_keep_alive(req(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Close"))
    assert not rules.wants_keep_alive(req(b"GET / HTTP/1.0\r\nConnection: keep-alive"))


def test_request_host_needs_exactly_one_host_in_http_1_1():
    """HTTP/1.1 without a Host header, or with two, is a 400; an absolute target wins over Host."""
    for head in (b"GET / HTTP/1.1", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b"):
        with pytest.raises(HTTPError):
            rules.request_host(req(head))
    assert rules.request_host(req(b"GET http://Wiki:81/x HTTP/1.1\r\nHost: other")) == "wiki:81"
    assert rules.request_host(req(b"GET / HTTP/1.0")) == ""


# -- translation ---------------------------------------------------------------------------


def _headers(head: bytes) -> list[tuple[bytes, bytes]]:
    return rules.parse_request_head(head.rstrip(b"\r\n")).headers


def test_backend_request_translates_host_and_adds_forwarding():
    """Host becomes the internal host; X-Forwarded-* and Forwarded are added; no Connection header
    (the connector keeps its own back-end connections alive)."""
    r = req(b"GET /p?q HTTP/1.1\r\nHost: wiki.apps.example.test:8080\r\nX-Forwarded-For: 10.0.0.1\r\n"
            b"X-Forwarded-Host: evil\r\nForwarded: for=10.0.0.1")
    head = rules.backend_request_head(r, 0, EXTERNAL, INTERNAL, "192.0.2.7")
    assert head.startswith(b"GET /p?q HTTP/1.1\r\n") and head.endswith(b"\r\n\r\n")
    h = _headers(head)
    assert rules.get(h, b"host") == [b"wiki.corp:8000"]
    assert rules.get(h, b"x-forwarded-for") == [b"10.0.0.1, 192.0.2.7"]
    assert rules.get(h, b"x-forwarded-host") == [b"wiki.apps.example.test:8080"]
    assert rules.get(h, b"x-forwarded-proto") == [b"http"]
    assert rules.get(h, b"forwarded") == [b'for=10.0.0.1, for=192.0.2.7;host="wiki.apps.example.test:8080";proto=http']
    assert rules.get(h, b"connection") == []
    assert rules.get(h, b"content-length") == []


def test_backend_request_keeps_host_when_translation_is_off():
    """translate_host=False leaves the client's Host header as it was."""
    r = req(b"GET / HTTP/1.1\r\nHost: wiki.apps.example.test:8080")
    h = _headers(rules.backend_request_head(r, 0, EXTERNAL, INTERNAL, "192.0.2.7", translate_host=False))
    assert rules.get(h, b"host") == [b"wiki.apps.example.test:8080"]


def test_backend_request_drops_the_clients_gateway_headers_and_cookies():
    """A client's X-Gateway-* headers (any case) and the gateway's cookies never reach the back end;
    the gateway's own headers (extra_headers) and the client's other cookies do."""
    r = req(b"GET / HTTP/1.1\r\nHost: a\r\nX-Gateway-Jwt-Assertion: forged\r\nx-gateway-request-id: f\r\n"
            b"X-GATEWAY-USER: admin\r\nCookie: a=1; gateway_session_0123abcd=v1.x; b=2\r\n"
            b"Cookie: gateway_signin_0123456789ab=v1.y\r\nX-Gatewayish: kept")
    h = _headers(rules.backend_request_head(r, 0, EXTERNAL, INTERNAL, "h",
                                            extra_headers=[(b"X-Gateway-Request-Id", b"ours")]))
    assert [k for k, _ in h if k.lower().startswith(b"x-gateway-")] == [b"X-Gateway-Request-Id"]
    assert rules.get(h, b"x-gateway-request-id") == [b"ours"]
    assert rules.get(h, b"cookie") == [b"a=1; b=2"]
    assert rules.get(h, b"x-gatewayish") == [b"kept"]


def test_backend_request_strips_hop_by_hop_and_sets_framing():
    """Hop-by-hop headers and those Connection names go; our own framing replaces the client's."""
    r = req(b"POST http://wiki.apps.example.test:8080/up?x=1 HTTP/1.1\r\nHost: wiki.apps.example.test:8080\r\n"
            b"Connection: keep-alive, X-Private\r\nX-Private: s\r\nKeep-Alive: 5\r\nTE: trailers\r\n"
            b"Upgrade: websocket\r\nProxy-Authorization: Basic x\r\nTransfer-Encoding: chunked\r\nX-Kept: 1")
    head = rules.backend_request_head(r, None, EXTERNAL, INTERNAL, "::1")
    assert head.startswith(b"POST /up?x=1 HTTP/1.1\r\n")
    h = _headers(head)
    names = {k.lower() for k, _ in h}
    for gone in (b"x-private", b"keep-alive", b"te", b"upgrade", b"proxy-authorization"):
        assert gone not in names
    assert rules.get(h, b"transfer-encoding") == [b"chunked"]
    assert rules.get(h, b"x-kept") == [b"1"]
    assert rules.get(h, b"x-forwarded-for") == [b"::1"]
    assert rules.get(h, b"forwarded")[0].startswith(b'for="[::1]"')
    length = _headers(rules.backend_request_head(req(b"PUT / HTTP/1.1\r\nHost: a"), 0, EXTERNAL, INTERNAL, "h"))
    assert rules.get(length, b"content-length") == [b"0"]


@pytest.mark.parametrize("location, expected", [
    (b"http://wiki.corp:8000/x?y#z", b"http://wiki.apps.example.test:8080/x?y#z"),
    (b"HTTP://WIKI.CORP:8000", b"http://wiki.apps.example.test:8080"),
    (b"http://wiki.corp:8001/x", b"http://wiki.corp:8001/x"),
    (b"https://wiki.corp:8000/x", b"https://wiki.corp:8000/x"),
    (b"http://elsewhere/x", b"http://elsewhere/x"),
    (b"/relative", b"/relative"),
    (b"http://wiki.corp:bad/", b"http://wiki.corp:bad/"),
])
def test_location_rewrite(location, expected):
    """Only a Location on the internal origin (scheme, host, port) is moved to the external origin."""
    assert rules.rewrite_location(location, EXTERNAL, INTERNAL) == expected


def test_location_rewrite_with_default_ports():
    """http://host/ and http://host:80/ are the same internal origin; the external default port is left out."""
    internal = Origin("http", "wiki.corp", 80)
    external = Origin("http", "wiki.example.test", 80)
    assert rules.rewrite_location(b"http://wiki.corp/a", external, internal) == b"http://wiki.example.test/a"
    assert rules.rewrite_location(b"http://wiki.corp:80/a", external, internal) == b"http://wiki.example.test/a"


@pytest.mark.parametrize("refresh, expected", [
    (b"5; url=http://wiki.corp:8000/x", b"5; url=http://wiki.apps.example.test:8080/x"),
    (b"0;URL='http://wiki.corp:8000/'", b"0; URL='http://wiki.apps.example.test:8080/'"),
    (b"5; url=http://other/x", b"5; url=http://other/x"),
    (b"5", b"5"),
])
def test_refresh_rewrite(refresh, expected):
    """The url of a Refresh header on the internal origin moves to the external origin."""
    assert rules.rewrite_refresh(refresh, EXTERNAL, INTERNAL) == expected


@pytest.mark.parametrize("cookie, expected", [
    (b"a=1; Domain=wiki.corp; Path=/", b"a=1; Domain=wiki.apps.example.test; Path=/"),
    (b"a=1; domain=.WIKI.corp", b"a=1; Domain=wiki.apps.example.test"),
    (b"a=1; Domain=corp", b"a=1; Domain=corp"),
    (b"a=1; Path=/", b"a=1; Path=/"),
])
def test_cookie_domain_rewrite(cookie, expected):
    """A Set-Cookie for the internal host's domain is set for the external host; other domains stay."""
    assert rules.rewrite_cookie_domain(cookie, EXTERNAL, INTERNAL) == expected


def test_client_response_head():
    """The client's head: hop-by-hop stripped, Location rewritten, the front door's framing and Connection."""
    response = rules.Response(b"HTTP/1.0", 302, b"Found", [
        (b"Location", b"http://wiki.corp:8000/x"), (b"Connection", b"close, X-Hop"), (b"X-Hop", b"1"),
        (b"Transfer-Encoding", b"chunked"), (b"Set-Cookie", b"a=1"),
        (b"Content-Location", b"http://wiki.corp:8000/c"), (b"Refresh", b"1; url=http://wiki.corp:8000/r")])
    head = rules.client_response_head(response, None, True, True, EXTERNAL, INTERNAL)
    assert head.startswith(b"HTTP/1.1 302 Found\r\n")
    h = rules.parse_response_head(head.rstrip(b"\r\n")).headers
    assert rules.get(h, b"location") == [b"http://wiki.apps.example.test:8080/x"]
    assert rules.get(h, b"x-hop") == [] and rules.get(h, b"set-cookie") == [b"a=1"]
    assert rules.get(h, b"content-location") == [b"http://wiki.apps.example.test:8080/c"]
    assert rules.get(h, b"refresh") == [b"1; url=http://wiki.apps.example.test:8080/r"]
    assert rules.get(h, b"transfer-encoding") == [b"chunked"]
    assert rules.get(h, b"connection") == [b"keep-alive"]
    head = rules.client_response_head(rules.Response(b"HTTP/1.1", 200, b"OK", [(b"Content-Length", b"7")]),
                                      0, False, False, EXTERNAL, INTERNAL)
    h = rules.parse_response_head(head.rstrip(b"\r\n")).headers
    assert rules.get(h, b"content-length") == [b"7"] and rules.get(h, b"connection") == [b"close"]


def test_error_page_names_the_correlation_id_and_escapes():
    """An error page is a complete closing response with the id in a header and the body, HTML escaped."""
    page = rules.error_page(502, "<b>down</b>", "0123456789abcdef")
    head, _, body = page.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"X-Request-Id: 0123456789abcdef" in head and b"Connection: close" in head
    assert b"Content-Length: %d" % len(body) in head
    assert b"0123456789abcdef" in body and b"&lt;b&gt;down" in body and b"<b>" not in body


# -- chunked framing -----------------------------------------------------------------------


def test_chunk_decoder_across_any_split():
    """A chunked body decodes to the same bytes however it is split, trailers dropped, rest returned."""
    wire = b"5;ext=1\r\nhello\r\n1A\r\n" + b"x" * 26 + b"\r\n0\r\nTrailer: t\r\n\r\nNEXT"
    for step in (1, 2, 3, 7, len(wire)):
        d = ChunkDecoder()
        out, rest = [], b""
        for i in range(0, len(wire), step):
            pieces, rest_part = d.feed(wire[i:i + step])
            out += pieces
            rest += rest_part
        assert b"".join(out) == b"hello" + b"x" * 26 and d.done and rest == b"NEXT"


@pytest.mark.parametrize("wire", [b"zz\r\n", b"5\r\nhelloXX", b"\r\n", b"1" * 20 + b"\r\n"])
def test_chunk_decoder_refuses_bad_framing(wire):
    """Bad sizes, data without its CRLF and empty size lines raise HTTPError."""
    with pytest.raises(HTTPError):
        ChunkDecoder().feed(wire)


def test_chunk_encoding_round_trips():
    """chunk() and LAST_CHUNK produce what ChunkDecoder reads back."""
    d = ChunkDecoder()
    pieces, rest = d.feed(rules.chunk(b"abc") + rules.chunk(b"\r\n") + rules.LAST_CHUNK)
    assert b"".join(pieces) == b"abc\r\n" and d.done and rest == b""


PREFIXED_EXTERNAL = Origin("https", "apps.example.test", 443, "/wiki/")
PREFIXED_INTERNAL = Origin("http", "wiki.corp", 8000, "/w/")


@pytest.mark.parametrize("target, expected", [
    (b"/wiki/page?x=1", b"/w/page?x=1"),
    (b"/wiki/", b"/w/"),
    (b"/wiki", b"/w/"),
    (b"/wiki?a", b"/w/?a"),
    (b"http://apps.example.test/wiki/a", b"/w/a"),
    (b"/other/", b"/other/"),
])
def test_path_prefix_is_translated_in_the_target(target, expected):
    """The external path prefix becomes the internal one; other paths pass unchanged."""
    head = rules.backend_request_head(req(b"GET " + target + b" HTTP/1.1\r\nHost: apps.example.test"), 0,
                                      PREFIXED_EXTERNAL, PREFIXED_INTERNAL, "192.0.2.7")
    assert head.split(b" ")[1] == expected


@pytest.mark.parametrize("location, expected", [
    (b"http://wiki.corp:8000/w/page", b"https://apps.example.test/wiki/page"),
    (b"/w/login?next=/w/", b"/wiki/login?next=/w/"),
    (b"http://wiki.corp:8000/elsewhere", b"https://apps.example.test/elsewhere"),
    (b"relative/x", b"relative/x"),
])
def test_location_moves_between_path_prefixes(location, expected):
    """A redirect under the internal prefix lands under the external prefix."""
    assert rules.rewrite_location(location, PREFIXED_EXTERNAL, PREFIXED_INTERNAL) == expected


def test_cookie_path_moves_between_path_prefixes():
    """Set-Cookie Path=/w/... becomes /wiki/...; a Path outside the prefix stays."""
    cookie = rules.rewrite_cookie_domain(b"s=1; Path=/w/app; HttpOnly", PREFIXED_EXTERNAL, PREFIXED_INTERNAL)
    assert cookie == b"s=1; Path=/wiki/app; HttpOnly"
    assert rules.rewrite_cookie_domain(b"s=1; Path=/", PREFIXED_EXTERNAL, PREFIXED_INTERNAL) == b"s=1; Path=/"


def test_upgrade_request_keeps_connection_upgrade():
    """A WebSocket handshake reaches the back end with Connection: Upgrade and its Upgrade header."""
    r = req(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13")
    assert rules.upgrade_protocols(r) == b"websocket"
    h = _headers(rules.backend_request_head(r, 0, EXTERNAL, INTERNAL, "192.0.2.7"))
    assert rules.get(h, b"connection") == [b"Upgrade"] and rules.get(h, b"upgrade") == [b"websocket"]
    assert rules.get(h, b"sec-websocket-key") == [b"dGhlIHNhbXBsZSBub25jZQ=="]
    plain = req(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket")   # not listed in Connection
    assert rules.upgrade_protocols(plain) is None
    assert rules.get(_headers(rules.backend_request_head(plain, 0, EXTERNAL, INTERNAL, "h")), b"upgrade") == []


def test_switching_protocols_head_keeps_upgrade():
    """A 101 goes to the client with Connection: Upgrade and the back end's Upgrade value."""
    response = rules.parse_response_head(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: x")
    head = rules.client_response_head(response, 0, False, True, EXTERNAL, INTERNAL)
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    h = rules.parse_response_head(head.rstrip(b"\r\n")).headers
    assert rules.get(h, b"connection") == [b"Upgrade"] and rules.get(h, b"upgrade") == [b"websocket"]
    assert rules.get(h, b"sec-websocket-accept") == [b"x"] and rules.get(h, b"content-length") == []


def test_custom_headers_replace_client_ones():
    """An app's custom request headers are added and win over a client header of the same name."""
    r = req(b"GET / HTTP/1.1\r\nHost: a\r\nX-Tenant: evil")
    h = _headers(rules.backend_request_head(r, 0, EXTERNAL, INTERNAL, "h", extra_headers=[(b"X-Tenant", b"corp")]))
    assert rules.get(h, b"x-tenant") == [b"corp"]


def test_only_allowed_upgrades_are_passed_on():
    """h2c is dropped with its Connection token unless allowed; of several offered, the allowed stay."""
    r = req(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: AAMAAABkAAQAAP__")
    assert rules.upgrade_protocols(r) is None
    h = _headers(rules.backend_request_head(r, 0, EXTERNAL, INTERNAL, "h"))
    assert rules.get(h, b"upgrade") == [] and rules.get(h, b"connection") == [] and rules.get(h, b"http2-settings") == []
    allowed = frozenset({b"websocket", b"h2c"})
    h = _headers(rules.backend_request_head(r, 0, EXTERNAL, INTERNAL, "h", upgrades=allowed))
    assert rules.get(h, b"upgrade") == [b"h2c"] and rules.get(h, b"connection") == [b"Upgrade"]
    both = req(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c, WebSocket/13")
    assert rules.upgrade_protocols(both) == b"WebSocket/13"


def test_translate_host_off_sends_the_routed_external_host():
    """With translate_host off the back end gets the external host routing used, not the client's Host."""
    r = req(b"GET http://wiki.apps.example.test:8080/x HTTP/1.1\r\nHost: other.example.test")
    h = _headers(rules.backend_request_head(r, 0, EXTERNAL, INTERNAL, "h", translate_host=False))
    assert rules.get(h, b"host") == [b"wiki.apps.example.test:8080"]
    bare = req(b"GET /x HTTP/1.0")
    h = _headers(rules.backend_request_head(bare, 0, EXTERNAL, INTERNAL, "h", translate_host=False))
    assert rules.get(h, b"host") == [b"wiki.apps.example.test:8080"]


def test_a_bare_lf_in_an_unfinished_head_is_found():
    """LF without CR anywhere in an unfinished head is found; CRLF and a lone trailing CR are not."""
    assert rules.bare_lf(b"GET / HTTP/1.1\nHost: a")
    assert rules.bare_lf(b"GET / HTTP/1.1\r\nHost: a\n")
    assert not rules.bare_lf(b"GET / HTTP/1.1\r\nHost: a\r")
    assert not rules.bare_lf(b"GET / HTTP/1.1\r\nHost: a\r\n")


def test_an_error_page_carries_extra_fields():
    """A 405 page carries its Allow header before Connection: close."""
    page = rules.error_page(405, "no", "id1", [(b"Allow", b"GET")])
    assert page.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n") and b"\r\nAllow: GET\r\nConnection: close\r\n" in page


def test_a_prefix_in_other_case_is_translated_too():
    """/WIKI/x, routed case-insensitively to the app at /wiki/, reaches the back end as /w/x."""
    assert rules.translate_target(b"/WIKI/x?q", PREFIXED_EXTERNAL, PREFIXED_INTERNAL) == b"/w/x?q"


def _fields_line_by_line(block: bytes) -> list[tuple[bytes, bytes]] | None:
    """RFC 9112's field-line, one line at a time, as plainly as it can be written: the reference
    the one-pass pattern of rules._parse_fields must agree with."""
    token = set(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    fields = []
    for line in block.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon or not name or not set(name) <= token or any(c in value for c in b"\r\n\0"):
            return None
        fields.append((name, value.strip(b" \t")))
    return fields


_VALUES = st.one_of(st.binary(max_size=10), st.text(alphabet=" \tab\r\n\x00é", max_size=8).map(str.encode))


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.builds(lambda name, value: name + value,
                          st.sampled_from([b"a:", b"X-Y: ", b"a", b":", b" a:", b"a :", b"a\t:"]), _VALUES),
                min_size=1, max_size=6))
def test_header_fields_are_parsed_as_the_line_by_line_reference_says(lines):
    """Trailing and leading white space is not part of a value; a malformed line refuses the head."""
    block = b"\r\n".join(lines)
    expected = _fields_line_by_line(block)
    try:
        got = rules._parse_fields(block)
    except HTTPError:
        got = None
    assert got == (expected if expected is None or len(expected) <= rules.MAX_HEADERS else None)
