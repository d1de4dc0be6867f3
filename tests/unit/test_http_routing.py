"""The http plugin's routing: scheme of the listener, Host (exact, wildcard), longest path prefix."""

from __future__ import annotations

import pytest
from attrs import frozen
from hypothesis import given
from hypothesis import strategies as st

from gateway_http import routing
from gateway_http.auth import Respond
from gateway_http.rules import HTTPError


@frozen
class App:
    name: str
    external_url: str


def route(table, host, target=b"/", scheme="http", redirect_to_https=False, method=b"GET"):
    """Route as the front door does: the target normalised first (an absolute-form one's host wins)."""
    authority, target = routing.request_target(method, target)
    return routing.route(table, authority or host, target, scheme, redirect_to_https)


def test_routing_by_host_and_port():
    """The Host header picks the app by host and port, case-insensitive, default port made explicit."""
    wiki = App("wiki", "http://Wiki.Apps.Example.Test:8080/")
    crm = App("crm", "http://crm.apps.example.test/")
    table = routing.routing_table([wiki, crm])
    assert route(table, "wiki.apps.example.test:8080") is wiki
    assert route(table, "WIKI.apps.example.test.:8080") is wiki
    assert route(table, "crm.apps.example.test") is crm
    assert route(table, "crm.apps.example.test:80") is crm
    assert route(table, "wiki.apps.example.test") is None
    assert route(table, "other.apps.example.test:8080") is None
    assert route(table, "") is None
    assert route(table, ":80") is None
    assert route(table, "crm.apps.example.test:http") is None
    assert route(table, "crm.apps.example.test:99999") is None


def test_ipv6_hosts_route():
    """A bracketed IPv6 Host routes to an app whose external URL names that address."""
    app = App("v6", "http://[::1]:8080/")
    assert route(routing.routing_table([app]), "[::1]:8080") is app
    assert route(routing.routing_table([app]), "[::1") is None
    assert route(routing.routing_table([app]), "[::1]x") is None


def test_the_listener_scheme_picks_the_apps_it_serves():
    """The https listener serves https apps, the plain one http apps, even on the same host."""
    secure = App("secure", "https://apps.example.test/")
    plain = App("plain", "http://apps.example.test/")
    table = routing.routing_table([secure, plain])
    assert route(table, "apps.example.test", scheme="https") is secure
    assert route(table, "apps.example.test:443", scheme="https") is secure
    assert route(table, "apps.example.test", scheme="http") is plain
    assert route(routing.routing_table([secure]), "apps.example.test", scheme="http") is None


def test_exact_host_beats_a_wildcard_and_a_wildcard_matches_any_depth():
    """*.apps.example.test serves names one label deep or more, not itself; an exact host wins."""
    star = App("star", "https://*.apps.example.test/")
    exact = App("exact", "https://wiki.apps.example.test/")
    deeper = App("deeper", "https://*.eu.apps.example.test/")
    table = routing.routing_table([star, exact, deeper])
    assert route(table, "wiki.apps.example.test", scheme="https") is exact
    assert route(table, "crm.apps.example.test", scheme="https") is star
    assert route(table, "CRM.Apps.Example.Test.", scheme="https") is star
    assert route(table, "a.b.apps.example.test", scheme="https") is star
    assert route(table, "x.eu.apps.example.test", scheme="https") is deeper
    assert route(table, "eu.apps.example.test", scheme="https") is star
    assert route(table, "apps.example.test", scheme="https") is None
    assert route(table, "xapps.example.test", scheme="https") is None
    assert route(table, "crm.apps.example.test:8443", scheme="https") is None


def test_longest_path_prefix_wins():
    """Apps on one host are told apart by the longest external_url path prefix the path starts with."""
    root = App("root", "https://apps.example.test/")
    wiki = App("wiki", "https://apps.example.test/wiki/")
    talk = App("talk", "https://apps.example.test/wiki/talk/")
    table = routing.routing_table([wiki, root, talk])
    for target, app in ((b"/", root), (b"/x", root), (b"/wiki/", wiki), (b"/wiki/page?a=1", wiki),
                        (b"/wiki/talk/", talk), (b"/wiki/talk/x", talk), (b"/wikix", root), (b"/WIKI/", wiki),
                        (b"https://apps.example.test/wiki/x", wiki)):
        assert route(table, "apps.example.test", target, "https") is app, target
    assert route(table, "apps.example.test", b"*", "https", method=b"OPTIONS") is root


def test_a_prefix_without_its_slash_redirects_to_it():
    """/wiki for an app at /wiki/ is a 308 to /wiki/ with the query kept, even with an app at /."""
    table = routing.routing_table([App("root", "https://apps.example.test/"),
                                   App("wiki", "https://apps.example.test/wiki/")])
    answer = route(table, "apps.example.test", b"/wiki?a=1&b", "https")
    assert isinstance(answer, Respond) and answer.status == 308
    assert (b"Location", b"/wiki/?a=1&b") in answer.headers


def test_no_prefix_matches_is_none():
    """A host whose apps all have prefixes the path misses is a 404; the exact host is not left for a wildcard."""
    table = routing.routing_table([App("wiki", "https://apps.example.test/wiki/"),
                                   App("star", "https://*.example.test/")])
    assert route(table, "apps.example.test", b"/crm/", "https") is None
    assert route(table, "other.example.test", b"/crm/", "https").name == "star"


def test_dot_segments_are_refused():
    """A path with . or .. segments (plain or %-escaped) or a backslash is a 400, never routed."""
    table = routing.routing_table([App("wiki", "https://apps.example.test/wiki/"),
                                   App("admin", "https://apps.example.test/admin/")])
    for target in (b"/wiki/../admin/", b"/wiki/%2e%2E/admin/", b"/wiki/./x", b"/wiki/..", b"/wiki\\..\\admin",
                   b"/wiki/%5c..%5cadmin", b"https://apps.example.test/wiki/../admin/", b"/wiki/..;x/admin/"):
        with pytest.raises(HTTPError) as raised:
            route(table, "apps.example.test", target, "https")
        assert raised.value.status == 400, target
    assert route(table, "apps.example.test", b"/wiki/a..b/.c/", "https").name == "wiki"


ROOT_AND_ADMIN = [App("root", "https://apps.example.test/"), App("admin", "https://apps.example.test/admin/")]

# Each spelling of /admin/x a back end may serve as the admin app (nginx, Tomcat, IIS...): it
# routes to the admin app with the path the back end gets, or is refused, never the root app.
BYPASSES = [
    (b"//admin/x", "admin", b"/admin/x"),
    (b"/%61dmin/x", "admin", b"/admin/x"),
    (b"/%2fadmin/x", 400, None),
    (b"/admin%2fx", 400, None),
    (b"/admin%5cx", 400, None),
    (b"/..%2fadmin/x", 400, None),
    (b"/%2e%2e/admin/x", 400, None),
    (b"/x/%2E./admin/x", 400, None),
    (b"/admin;x/x", 400, None),
    (b"/ADMIN/x", "admin", b"/ADMIN/x"),
    (b"/Admin/x?q=%41", "admin", b"/Admin/x?q=%41"),
    (b"admin/x", 400, None),
    (b"/admin%00/x", 400, None),
    (b"/admin%1/x", 400, None),
    (b"/x%zz", 400, None),
    (b"http://apps.example.test//admin/x", "admin", b"/admin/x"),
    (b"http://user@apps.example.test/admin/x", 400, None),
    (b"*", 400, None),
    (b"apps.example.test:443", 400, None),
    (b"/ok;jsessionid=1/x", "root", b"/ok;jsessionid=1/x"),
    (b"/admin/x;jsessionid=1", "admin", b"/admin/x;jsessionid=1"),
    (b"/a/%7Eb%c3%a9", "root", b"/a/~b%C3%A9"),
]


@pytest.mark.parametrize("target,expected,forwarded", BYPASSES)
def test_no_spelling_of_a_prefix_escapes_its_app(target, expected, forwarded):
    """Every known spelling of /admin/x routes to the /admin/ app (with the normalised path) or is a 400."""
    table = routing.routing_table(ROOT_AND_ADMIN)
    if expected == 400:
        with pytest.raises(HTTPError) as raised:
            route(table, "apps.example.test", target, "https")
        assert raised.value.status == 400
        return
    authority, normal = routing.request_target(b"GET", target)
    assert normal == forwarded
    assert route(table, "apps.example.test", target, "https").name == expected


def test_other_target_forms_only_for_their_methods():
    """* is for OPTIONS, an authority for CONNECT; each is refused with any other method."""
    assert routing.request_target(b"OPTIONS", b"*") == (None, b"*")
    assert routing.request_target(b"CONNECT", b"db.internal:5432") == (None, b"db.internal:5432")
    assert routing.request_target(b"CONNECT", b"[::1]:22") == (None, b"[::1]:22")
    for method, target in ((b"GET", b"*"), (b"CONNECT", b"db.internal"), (b"CONNECT", b"/x"), (b"GET", b"a:1")):
        with pytest.raises(HTTPError):
            routing.request_target(method, target)


_SEGMENT = st.text(alphabet="aAdDmMiInN%2fF5cC.;-_~/0123456789x", max_size=12)


@given(st.lists(_SEGMENT, max_size=5))
def test_a_normalised_path_that_matched_a_prefix_starts_with_its_segments(segments):
    """Whatever the client sends, a path routed to the /admin/ app starts with /admin/ (case aside),
    and one routed elsewhere would not be /admin/... to a back end that ignores case and ;params."""
    table = routing.routing_table(ROOT_AND_ADMIN)
    target = ("/" + "/".join(segments)).encode()
    try:
        _, normal = routing.request_target(b"GET", target)
        app = route(table, "apps.example.test", target, "https")
    except HTTPError as e:
        assert e.status == 400
        return
    if isinstance(app, Respond):
        return
    as_seen = routing.match_key(normal.decode("latin-1"))
    assert (app.name == "admin") == as_seen.startswith("/admin/")
    if app.name == "admin":
        assert normal[:7].lower() == b"/admin/"
    assert "//" not in as_seen and "%2f" not in as_seen.lower()


@pytest.mark.parametrize("host,key", [
    ("Wiki.Example.Test", ("wiki.example.test", 443)), ("wiki.example.test.:8443", ("wiki.example.test", 8443)),
    ("10.0.0.1:80", ("10.0.0.1", 80)), ("[::1]", ("::1", 443)), ("[0:0::1]:8443", ("::1", 8443)),
    ("my_host", ("my_host", 443)),
])
def test_valid_hosts_have_a_key(host, key):
    """Host names, IPv4 and bracketed IPv6 addresses with an optional port are accepted, lower case."""
    assert routing.route_key(host, "https") == key


@pytest.mark.parametrize("host", [
    'a.example.test"', "a.example.test?x", "a.example.test/x", "a.example.test;proto=http", "a,b.example.test",
    "a b", "user@a.example.test", "a.example.test:0", "a.example.test:65536", "a.example.test:", "a..b",
    ".a", "[::1", "[::1]x", "[zz::1]", "[v1.x]", "a.example.test:8a", "\u00e9.example.test", "%61.example.test",
    "a.example.test:123456", "[::1]:", "",
])
def test_invalid_hosts_have_none(host):
    """Anything but a host name or address with an optional port 1-65535 is not a host."""
    assert routing.route_key(host, "https") is None


def test_plain_requests_for_https_apps_redirect():
    """With redirect_to_https a plain request for an https app is a 308 to https, same path and query."""
    secure = App("secure", "https://apps.example.test/")
    wiki = App("wiki", "https://apps.example.test:8443/wiki/")
    star = App("star", "https://*.example.test/")
    plain = App("plain", "http://plain.example.test/")
    table = routing.routing_table([secure, wiki, star, plain])

    def location(host, target):
        answer = route(table, host, target, "http", redirect_to_https=True)
        assert isinstance(answer, Respond) and answer.status == 308, (host, target, answer)
        return dict(answer.headers)[b"Location"].decode()

    assert location("apps.example.test", b"/x?q=1") == "https://apps.example.test/x?q=1"
    assert location("Apps.Example.Test:8080", b"/wiki/p") == "https://apps.example.test/wiki/p"
    assert location("a.example.test:80", b"/") == "https://a.example.test/"
    assert route(table, "plain.example.test", b"/", "http", redirect_to_https=True) is plain
    assert route(table, "apps.example.test", b"/x", "http", redirect_to_https=False) is None
    assert route(table, "nowhere.test", b"/", "http", redirect_to_https=True) is None
    only_wiki = routing.routing_table([wiki])
    assert dict(route(only_wiki, "apps.example.test", b"/wiki/a", "http", True).headers)[b"Location"] == \
        b"https://apps.example.test:8443/wiki/a"
    assert route(only_wiki, "apps.example.test", b"/other", "http", True) is None


def test_request_origin_of_a_wildcard_app_is_the_host_asked_for():
    """For a wildcard app the external origin is the requested host; otherwise the external_url's."""
    star = App("star", "https://*.apps.example.test/")
    assert routing.request_origin(star, "crm.apps.example.test.", "https") == ("https", "crm.apps.example.test", 443)
    wiki = App("wiki", "https://apps.example.test:8443/wiki/")
    assert routing.request_origin(wiki, "whatever", "https") == ("https", "apps.example.test", 8443)
