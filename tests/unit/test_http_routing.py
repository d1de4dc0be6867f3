"""The http plugin's routing: scheme of the listener, Host (exact, wildcard), longest path prefix."""

from __future__ import annotations

from attrs import frozen

from gateway_http import routing
from gateway_http.auth import Respond


@frozen
class App:
    name: str
    external_url: str


def route(table, host, target=b"/", scheme="http", redirect_to_https=False):
    return routing.route(table, host, target, scheme, redirect_to_https)


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
                        (b"/wiki/talk/", talk), (b"/wiki/talk/x", talk), (b"/wikix", root), (b"/WIKI/", root),
                        (b"https://apps.example.test/wiki/x", wiki), (b"*", root)):
        assert route(table, "apps.example.test", target, "https") is app, target


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
                   b"/wiki/%5c..%5cadmin", b"https://apps.example.test/wiki/../admin/"):
        answer = route(table, "apps.example.test", target, "https")
        assert isinstance(answer, Respond) and answer.status == 400, target
    assert route(table, "apps.example.test", b"/wiki/a%2Fb..c/", "https").name == "wiki"


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
