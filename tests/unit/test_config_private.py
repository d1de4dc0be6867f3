"""Tests for the Private Access keys of gateway.config: private apps (segments, assignment,
overlaps across groups), the options.preauth = "none" listen apps must carry, and [access]."""

from __future__ import annotations

import pytest

from gateway.config import AccessConfig, parse_app, parse_config
from gateway.errors import ConfigError

FILE = "conf/x.toml"


def service(**extra):
    return {"state_dir": "/srv/gw", **extra}


def private(name="corp", group="default", segments=None, **options):
    """A valid private app: one TCP segment, assigned to alice unless options say otherwise."""
    return {"name": name, "group": group,
            "options": options or {"allowed_users": ["alice@example.test"]},
            "segments": segments or [{"destination": "10.1.0.0/16", "ports": "22,8000-8100"}]}


def listen_app(**extra):
    return {"name": "ssh", "listen": "tcp:2222", "destination": "10.0.0.9:22", **extra}


def error_for(data) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, FILE)
    return info.value


# --- private apps ----------------------------------------------------------------------------


def test_private_app_is_parsed_with_its_segments():
    """An app with segments is private: no listen, destination, host or port; segments parsed."""
    (app,) = parse_config({"service": service(), "apps": [private()]}, FILE).apps
    assert app.is_private and (app.listen, app.destination, app.host, app.port) == ("", "", "", 0)
    assert [str(s) for s in app.segments] == ["tcp 10.1.0.0/16:22,8000-8100"]
    assert app.protocol == "tcp" and app.options == {"allowed_users": ["alice@example.test"]}


@pytest.mark.parametrize("key, value", [
    ("listen", "tcp:2222"), ("destination", "10.0.0.9:22"),
    ("external_url", "https://x.example.test/"), ("internal_url", "http://x.corp/"),
])
def test_private_app_refuses_listen_and_urls(key, value):
    """listen, destination, external_url and internal_url next to segments are refused, naming the key."""
    e = error_for({"service": service(), "apps": [{**private(), key: value}]})
    assert e.key == f"apps[0].{key}" and "expected no" in e.expected and "private app" in e.expected


def test_private_app_needs_an_assignment():
    """A private app without allowed_users or allowed_groups (or with both empty) is refused."""
    for options in ({"idle_timeout": 30}, {"allowed_users": [], "allowed_groups": []}):
        app = {**private(), "options": options}
        e = error_for({"service": service(), "apps": [app]})
        assert e.key == "apps[0].options.allowed_users"
        assert "reachable only by the users assigned to it" in e.expected


@pytest.mark.parametrize("key, value", [
    ("allowed_users", "alice"), ("allowed_users", [""]), ("allowed_groups", [" "]), ("allowed_groups", [3]),
])
def test_assignment_must_be_a_list_of_non_empty_strings(key, value):
    """allowed_users / allowed_groups that are not lists of non-empty strings are refused, naming the key."""
    e = error_for({"service": service(), "apps": [{**private(), "options": {key: value}}]})
    assert e.key == f"apps[0].options.{key}" and "a list of non-empty strings" in e.expected


def test_assignment_by_group_alone_is_enough():
    """allowed_groups alone assigns a private app."""
    (app,) = parse_config({"service": service(), "apps": [private(allowed_groups=["admins"])]}, FILE).apps
    assert app.options == {"allowed_groups": ["admins"]}


def test_private_app_refuses_preauth_and_http():
    """options.preauth and protocol "http" make no sense on a private app: refused with the reason."""
    e = error_for({"service": service(), "apps": [private(allowed_users=["a"], preauth="none")]})
    assert e.key == "apps[0].options.preauth" and "always sign in" in e.expected
    e = error_for({"service": service(), "apps": [{**private(), "protocol": "http"}]})
    assert e.key == "apps[0].protocol" and "external_url" in e.expected


def test_bad_segment_is_named_with_its_index():
    """A malformed segment is refused naming apps[i].segments[j] and the key inside it."""
    segments = [{"destination": "10.0.0.0/8", "ports": 22}, {"destination": "10.0.0.0/8", "ports": "70000"}]
    e = error_for({"service": service(), "apps": [listen_app(options={"preauth": "none"}),
                                                   private(segments=segments)]})
    assert e.key == "apps[1].segments[1].ports"
    e = error_for({"service": service(), "apps": [{**private(), "segments": []}]})
    assert e.key == "apps[0].segments" and "non-empty array" in e.expected


def test_overlapping_segments_in_different_groups_are_refused_naming_both():
    """Two apps of different groups whose segments overlap: refused naming both segments, the app and its group."""
    a = private("a", "east", [{"destination": "10.9.0.0/16", "ports": 22},
                              {"destination": "10.1.0.0/16", "ports": "8000-8100"}])
    b = private("b", "west", [{"destination": "10.1.2.3", "ports": "8080"}])
    e = error_for({"service": service(), "apps": [a, b]})
    assert e.key == "apps[1].segments[0]"
    assert '"tcp 10.1.2.3:8080"' in e.expected and 'apps[0].segments[1] "tcp 10.1.0.0/16:8000-8100"' in e.expected
    assert '(app "a", group "east")' in e.expected


def test_overlaps_are_fine_within_a_group_or_apart():
    """Overlapping segments of one group, and disjoint ports or protocols across groups, are accepted."""
    a = private("a", "east", [{"destination": "10.1.0.0/16", "ports": 22}])
    same_group = private("b", "east", [{"destination": "10.1.2.3", "ports": 22}])
    other_port = private("c", "west", [{"destination": "10.1.2.3", "ports": 23}])
    udp = private("d", "west", [{"destination": "10.1.2.3", "ports": 22, "protocol": "udp"}])
    cfg = parse_config({"service": service(), "apps": [a, same_group, other_port, udp]}, FILE)
    assert [x.name for x in cfg.apps] == ["a", "b", "c", "d"]


def test_wildcard_and_name_overlap_across_groups_is_refused():
    """A host name under another group's *. wildcard overlaps it."""
    a = private("a", "east", [{"destination": "*.corp.example", "ports": 443}])
    b = private("b", "west", [{"destination": "wiki.corp.example", "ports": "443"}])
    assert error_for({"service": service(), "apps": [a, b]}).key == "apps[1].segments[0]"


def test_parse_app_takes_private_apps():
    """parse_app (the store's and gateway apps' parser) reads a private app with bare keys in errors."""
    assert parse_app(private(), source="gateway apps").is_private
    with pytest.raises(ConfigError) as info:
        parse_app({**private(), "options": {}}, source="gateway apps")
    assert info.value.key == "options.allowed_users"


def test_app_names_never_start_with_a_dot():
    """".gateway-login" is the http plugin's own route: app names cannot start with "."."""
    e = error_for({"service": service(), "apps": [{**private(), "name": ".gateway-login"}]})
    assert e.key == "apps[0].name"


# --- listen apps say options.preauth = "none" ------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"preauth": "passthrough"}, {"preauth": "oidc"}, {"preauth": True}])
def test_listen_app_must_say_preauth_none(options):
    """A listen app without options.preauth = "none" is refused, naming the key and both ways out."""
    e = error_for({"service": service(), "apps": [listen_app(options=options)]})
    assert e.key == "apps[0].options.preauth"
    assert 'add options.preauth = "none"' in e.expected and "segments" in e.expected and "app ssh" in e.expected


def test_listen_app_with_preauth_none_is_accepted():
    """options.preauth = "none" on a listen app is accepted and kept."""
    (app,) = parse_config({"service": service(), "apps": [listen_app(options={"preauth": "none"})]}, FILE).apps
    assert app.options == {"preauth": "none"} and not app.is_private


def test_web_apps_need_no_preauth_none():
    """Web apps (external_url, internal_url) sign users in on the front door: no preauth = "none" needed."""
    web = {"name": "wiki", "external_url": "https://wiki.example.test/", "internal_url": "http://wiki.corp/"}
    assert parse_config({"service": service(), "apps": [web]}, FILE).apps[0].options == {}


# --- [access] --------------------------------------------------------------------------------


def test_access_defaults():
    """[access] with nothing set: no url, the tunnel at service.names[0] and service.listen's port, documented defaults."""
    cfg = parse_config({"service": service(listen="tcp:9443", names=["gw.example.test", "10.0.0.1"]),
                        "access": {}}, FILE)
    assert cfg.access == AccessConfig(url="", tunnel="gw.example.test:9443", certificate_lifetime=3600,
                                      login_lifetime=43200, udp_idle_timeout=60.0, max_tunnels_per_user=16)


def test_no_access_table_means_none():
    """Without [access] there is no Private Access: GatewayConfig.access is None."""
    assert parse_config({"service": service()}, FILE).access is None


def test_access_tunnel_default_brackets_ipv6_and_default_listen():
    """An IPv6 first name is bracketed; the default service.listen gives port 8443."""
    cfg = parse_config({"service": service(names=["::1"]), "access": {}}, FILE)
    assert cfg.access.tunnel == "[::1]:8443"


def test_access_explicit_values():
    """Every [access] key set is kept."""
    cfg = parse_config({"service": service(names=["gw.example.test", "*.nodes.example.test"]), "access": {
        "url": "https://access.example.test/", "tunnel": "n1.nodes.example.test:443", "certificate_lifetime": 600,
        "login_lifetime": 3600, "udp_idle_timeout": 5, "max_tunnels_per_user": 2}}, FILE)
    assert cfg.access == AccessConfig("https://access.example.test/", "n1.nodes.example.test:443", 600, 3600, 5.0, 2)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/", "http://localhost:8080/", "http://[::1]:8080/"])
def test_plain_http_url_on_loopback_is_accepted(url):
    """Plain http for [access] url is fine on loopback (tests, demos)."""
    assert parse_config({"service": service(), "access": {"url": url}}, FILE).access.url == url


@pytest.mark.parametrize("url, words", [
    ("http://access.example.test/", "https://"),
    ("ftp://access.example.test/", "https://"),
    ("https://access.example.test/login", 'ends with "/"'),
    ("https://user@access.example.test/", "without user name"),
    ("https://access.example.test/?x=1", "without query"),
    ("", "an absolute URL"),
    (8080, "an absolute URL"),
])
def test_bad_access_url_is_refused(url, words):
    """An [access] url that is not https (or http on loopback), or not a plain origin and path, is refused."""
    e = error_for({"service": service(), "access": {"url": url}})
    assert e.key == "access.url" and words in e.expected


@pytest.mark.parametrize("tunnel, words", [
    ("gw.example.test", '"host:port"'),
    ("gw.example.test:0", '"host:port"'),
    ("other.example.test:8443", "add the host to service.names"),
    ("*.nodes.example.test:443", '"host:port"'),
])
def test_bad_access_tunnel_is_refused(tunnel, words):
    """access.tunnel must be host:port with a host the node certificate names (service.names)."""
    e = error_for({"service": service(names=["gw.example.test"]), "access": {"tunnel": tunnel}})
    assert e.key == "access.tunnel" and words in e.expected


def test_access_tunnel_without_a_tcp_listen_needs_a_value():
    """With service.listen on a UNIX socket there is no port to default to: access.tunnel is required."""
    e = error_for({"service": service(listen="unix:/run/gw.sock"), "access": {}})
    assert e.key == "access.tunnel" and "no TCP port" in e.expected


@pytest.mark.parametrize("key, value", [
    ("certificate_lifetime", 10), ("certificate_lifetime", "1h"), ("login_lifetime", 0),
    ("udp_idle_timeout", 0), ("max_tunnels_per_user", 0), ("max_tunnels_per_user", 5000), ("urll", "x"),
])
def test_bad_access_numbers_and_unknown_keys(key, value):
    """Out-of-range or mistyped [access] values, and unknown keys, are refused naming the key."""
    e = error_for({"service": service(), "access": {key: value}})
    assert e.key == f"access.{key}"


def test_access_needs_a_service():
    """[access] in a connector-only file is refused."""
    e = error_for({"connector": {"state_dir": "/c"}, "access": {}})
    assert e.key == "access" and "[service]" in e.expected


def test_a_private_app_of_port_445_alone_gets_the_smb_plugin():
    """File-share segments (445 alone) default to protocol smb; other ports, or a named protocol, keep theirs."""
    base = {"name": "files", "options": {"allowed_users": ["alice"]}}
    assert parse_app({**base, "segments": [{"destination": "10.0.0.5", "ports": 445},
                                           {"destination": "10.0.0.0/24", "ports": "445", "protocol": "tcp"},
                                           {"destination": "10.0.0.53", "ports": 53, "protocol": "udp"}]}).protocol == "smb"
    assert parse_app({**base, "segments": [{"destination": "10.0.0.5", "ports": "445,3389"}]}).protocol == "tcp"
    assert parse_app({**base, "segments": [{"destination": "10.0.0.5", "ports": "444-445"}]}).protocol == "tcp"
    assert parse_app({**base, "protocol": "tcp", "segments": [{"destination": "10.0.0.5", "ports": 445}]}).protocol == "tcp"
    assert parse_app({**base, "segments": [{"destination": "10.0.0.53", "ports": 445, "protocol": "udp"}]}).protocol == "tcp"
