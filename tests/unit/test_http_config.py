"""Web apps in the config file and the http plugin's [http] table: what is accepted, what is refused."""

from __future__ import annotations

import pytest

from gateway import plugins
from gateway.config import parse_config
from gateway.errors import ConfigError, GatewayError

import gateway_http


def config(*apps, http=None, sections=None):
    data = {"service": {"state_dir": "/tmp/gw-state"}, "apps": list(apps)}
    if http is not None:
        data["http"] = http
    return parse_config(data, "gw.toml", sections)


def web(**extra):
    return {"name": "wiki", "external_url": "http://wiki.apps.example.test:8080/",
            "internal_url": "http://wiki.corp:8000/", **extra}


def refused(*apps, **kwargs) -> str:
    with pytest.raises(ConfigError) as e:
        config(*apps, **kwargs)
    return str(e.value)


def test_web_app_gets_destination_from_internal_url():
    """A web app has no listen; destination, host and port come from internal_url; protocol defaults to http."""
    app, = config(web()).apps
    assert (app.protocol, app.listen, app.destination, app.host, app.port) == ("http", "", "wiki.corp:8000",
                                                                                 "wiki.corp", 8000)
    assert app.external_url == "http://wiki.apps.example.test:8080/"


def test_default_port_and_ipv6_internal_url():
    """Without a port the scheme's default is used; an IPv6 host becomes a bracketed destination."""
    app, = config(web(internal_url="http://[2001:db8::5]/")).apps
    assert (app.host, app.port, app.destination) == ("2001:db8::5", 80, "[2001:db8::5]:80")


def test_tcp_apps_are_unchanged_next_to_web_apps():
    """A tcp app still needs listen and destination and may sit next to web apps."""
    cfg = config(web(), {"name": "db", "listen": "tcp:15432", "destination": "db.corp:5432",
                          "options": {"preauth": "none"}})
    assert [a.protocol for a in cfg.apps] == ["http", "tcp"]
    assert "apps[0].listen" in refused({"name": "db", "destination": "db.corp:5432"})


@pytest.mark.parametrize("key, value, words", [
    ("external_url", "ftp://wiki.example.test/", "unknown scheme: ftp:"),
    ("external_url", "ws://wiki.example.test/", "unknown scheme: ws:"),
    ("external_url", "wiki.example.test", "unknown scheme: none:"),
    ("external_url", "http:///", "with a host"),
    ("external_url", "http://wiki.example.test:99999/", "valid host and port"),
    ("external_url", "http://wiki.example.test:0/", "port 1..65535"),
    ("external_url", "http://u:p@wiki.example.test/", "without user name"),
    ("external_url", "http://wiki.example.test/?a=1", "without query"),
    ("external_url", "http://wiki.example.test/sub", 'path ends with "/"'),
    ("external_url", "http://wiki.example.test/a/../b/", "plain path prefix"),
    ("external_url", "http://*.test/", "two labels or more"),
    ("external_url", "http://a.*.example.test/", "valid DNS name"),
    ("internal_url", "http://*.corp/", "valid DNS name"),
    ("external_url", "http://bad_name!.test/", "valid DNS name"),
    ("internal_url", "ftp://wiki.corp/", "unknown scheme: ftp:"),
    ("internal_url", 8000, "an absolute URL"),
    ("internal_url", "", "an absolute URL"),
])
def test_invalid_urls_are_refused(key, value, words):
    """Bad external and internal URLs are refused with the key and what was wrong."""
    message = refused(web(**{key: value}))
    assert f"apps[0].{key}" in message and words in message


def test_both_urls_are_required():
    """A web app without its internal_url (or external_url) is refused naming the missing key."""
    app = web()
    del app["internal_url"]
    assert "apps[0].internal_url" in refused(app) and "required" in refused(app)
    app = web()
    del app["external_url"]
    assert "apps[0].external_url" in refused(app)


def test_duplicate_external_hosts_are_refused():
    """Two apps on one external scheme, host and port (case and default port ignored) are refused."""
    message = refused(web(external_url="http://wiki.example.test/"),
                      web(name="other", external_url="http://WIKI.example.test:80"))
    assert "apps[1].external_url" in message and "apps[0]" in message
    assert len(config(web(), web(name="other", external_url="http://wiki.apps.example.test:8081/")).apps) == 2


def test_listen_or_destination_in_a_web_app_is_refused():
    """listen and destination come from the front door and internal_url, so setting them is an error."""
    assert "apps[0].listen: expected no listen" in refused(web(listen="tcp:8080"))
    assert "apps[0].destination: expected no destination" in refused(web(destination="a:1"))


def test_urls_in_a_tcp_app_are_refused():
    """external_url in an app that names another protocol is refused."""
    message = refused(web(protocol="tcp"))
    assert 'apps[0].protocol: expected "http" in an app with external_url' in message


def sections():
    pm = plugins.make_plugin_manager({})
    return plugins.config_sections(pm)


def test_http_table_is_parsed_by_the_plugin():
    """[http] listen and the timeouts are read by the plugin; listen defaults to tcp:80."""
    parsed = config(web(), http={"listen": "tcp:8080", "idle_timeout": 5, "send_timeout": 300},
                    sections=sections()).sections["http"]
    assert {k: parsed[k] for k in ("listen", "header_timeout", "idle_timeout", "body_timeout", "send_timeout")} == {
        "listen": "tcp:8080", "header_timeout": 30.0, "idle_timeout": 5.0, "body_timeout": 60.0, "send_timeout": 300.0}
    assert config(web(), sections=sections()).sections["http"]["listen"] == "tcp:80"
    defaults = config(web(), sections=sections()).sections["http"]
    assert (defaults["max_connections"], defaults["max_connections_per_address"]) == (10000, 256)
    assert config(web(), http={"max_connections_per_address": 8},
                  sections=sections()).sections["http"]["max_connections_per_address"] == 8


@pytest.mark.parametrize("table, words", [
    ({"listen": 8080}, "http.listen"),
    ({"listen": "nonsense:x"}, "http.listen"),
    ({"lisen": "tcp:80"}, "http.lisen: unknown key"),
    ({"header_timeout": 0}, "http.header_timeout: expected a number of seconds > 0"),
    ({"idle_timeout": "60"}, "http.idle_timeout: expected a number of seconds > 0"),
    ({"idle_timeout": True}, "http.idle_timeout"),
    ({"send_timeout": -1}, "http.send_timeout: expected a number of seconds > 0"),
    ({"max_connections": 0}, "http.max_connections: expected a number of connections"),
    ({"max_connections": "many"}, "http.max_connections: expected a number of connections"),
    ({"max_connections_per_address": True}, "http.max_connections_per_address: expected a number"),
    ({"max_connections_per_address": 1.5}, "http.max_connections_per_address: expected a number"),
])
def test_bad_http_table_is_refused(table, words):
    """A bad [http] table is refused with the dotted key."""
    assert words in refused(web(), http=table, sections=sections())


def test_translate_host_must_be_a_boolean():
    """options.translate_host other than true/false stops the front door from starting."""
    cfg = config(web(options={"translate_host": "yes"}))
    with pytest.raises(GatewayError, match="translate_host"):
        gateway_http.check_options(gateway_http.web_apps(cfg))


def test_https_path_prefixes_and_wildcards_are_accepted():
    """https on either side, a path prefix and a *. wildcard host are valid web-app URLs."""
    a, b, c = config(web(name="a", external_url="https://apps.example.test/wiki/", internal_url="https://wiki.corp/w/"),
                     web(name="b", external_url="https://apps.example.test/crm/"),
                     web(name="c", external_url="https://*.apps.example.test/")).apps
    assert (a.host, a.port, a.destination) == ("wiki.corp", 443, "wiki.corp:443")
    assert c.external_url == "https://*.apps.example.test/"


def test_same_host_and_path_twice_is_refused():
    """Two apps may share a host with different paths, but not the same host and path."""
    message = refused(web(name="a", external_url="https://apps.example.test/wiki/"),
                      web(name="b", external_url="https://APPS.example.test:443/wiki/"))
    assert "apps[1].external_url" in message and "unique among apps" in message


@pytest.mark.parametrize("options, words", [
    ({"backend_timeout": "forever"}, "options.backend_timeout"),
    ({"backend_timeout": 0}, "options.backend_timeout"),
    ({"backend_timeout": True}, "options.backend_timeout"),
    ({"request_headers": {"X Bad": "v"}}, "options.request_headers"),
    ({"request_headers": {"X-Ok": "line\nbreak"}}, "options.request_headers"),
    ({"request_headers": {"Connection": "close"}}, "set by the front door"),
    ({"request_headers": {"X-Gateway-Jwt-Assertion": "x"}}, "X-Gateway-Jwt-Assertion is set by the front door"),
    ({"request_headers": ["X-A"]}, "options.request_headers"),
    ({"allow_connect": "yes"}, "options.allow_connect: expected true or false"),
    ({"allow_trace": 1}, "options.allow_trace: expected true or false"),
    ({"upgrade_protocols": "h2c"}, "options.upgrade_protocols: expected a list"),
    ({"upgrade_protocols": ["web socket"]}, "options.upgrade_protocols: expected a list"),
])
def test_bad_web_app_options_are_refused(options, words):
    """Per-app back-end timeout and custom headers are checked before the front door starts."""
    with pytest.raises(GatewayError, match=words):
        gateway_http.check_options(gateway_http.web_apps(config(web(options=options))))


def test_good_web_app_options_pass():
    """"long", seconds and a header table are fine."""
    for options in ({"backend_timeout": "long"}, {"backend_timeout": 30}, {"allow_connect": True},
                    {"upgrade_protocols": ["websocket", "h2c"]}, {"upgrade_protocols": []},
                    {"request_headers": {"X-Tenant": "corp", "X-Env": "prod 1"}}):
        gateway_http.check_options(gateway_http.web_apps(config(web(options=options))))


@pytest.mark.parametrize("options, words", [
    ({"sso": "kerberos"}, 'set options.preauth = "oidc" too'),
    ({"sso": 3, "preauth": "oidc"}, "options.sso"),
    ({"backend_max_idle": "many"}, "backend_max_idle"),
    ({"backend_connection_per_user": 1}, "options.backend_connection_per_user: expected true or false"),
    ({"sso": "kerberos", "preauth": "oidc", "backend_connection_per_user": False}, "cannot apply with options.sso"),
])
def test_sso_and_back_end_options_are_checked_on_the_service(options, words):
    """SSO without pre-authentication and badly typed back-end options stop the service, not only the connector."""
    with pytest.raises(GatewayError, match=words):
        gateway_http.check_options(gateway_http.web_apps(config(web(options=options))))


@pytest.mark.parametrize("options, key", [
    ({"allowed_groups": ["g"]}, "allowed_groups"),
    ({"allowed_users": ["a"]}, "allowed_users"), ({"jwt_assertion": False}, "jwt_assertion"),
    ({"sso": "kerberos"}, "sso"),
])
def test_sign_in_options_on_an_app_with_its_own_listener_are_refused(options, key):
    """An http app with its own listen has no sign-in: its sign-in options are refused, naming the key and the fix."""
    own = {"name": "site", "protocol": "http", "listen": "tcp:8081", "destination": "site.corp:80",
           "options": {"preauth": "none", **options}}
    with pytest.raises(GatewayError, match=f"app site: options.{key} cannot apply .* external_url"):
        gateway_http.check_own_listener_apps(gateway_http.own_listener_apps(config(own)))


def test_an_app_with_its_own_listener_cannot_say_oidc():
    """preauth = "oidc" on an http app with its own listen is refused by the core config: it must say "none",
    and the error points at external_url and internal_url for a web app whose users sign in."""
    own = {"name": "site", "protocol": "http", "listen": "tcp:8081", "destination": "site.corp:80",
           "options": {"preauth": "oidc"}}
    text = refused(own)
    assert 'apps[0].options.preauth: expected "none" on app site' in text and "external_url" in text


def test_an_app_with_its_own_listener_may_say_none():
    """preauth = "none" and back-end options are fine on an app with its own listen; bad ones are checked."""
    own = {"name": "site", "protocol": "http", "listen": "tcp:8081", "destination": "site.corp:80",
           "options": {"preauth": "none", "backend_timeout": "long"}}
    gateway_http.check_own_listener_apps(gateway_http.own_listener_apps(config(own)))
    own["options"] = {"preauth": "none", "backend_timeout": "forever"}
    with pytest.raises(GatewayError, match="options.backend_timeout"):
        gateway_http.check_own_listener_apps(gateway_http.own_listener_apps(config(own)))
