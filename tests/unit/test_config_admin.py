"""The [admin] table: defaults, and each bad value refused with the key named."""

from __future__ import annotations

import pytest

from gateway.config import AdminConfig, parse_config
from gateway.errors import ConfigError


def parse(admin: dict, service: dict | None = None):
    data = {"admin": admin}
    if service is not False:
        data["service"] = {"state_dir": "/tmp/gateway-state", **(service or {})}
    return parse_config(data, "/etc/gateway/gateway.toml")


def test_defaults_listen_on_loopback_over_https():
    """An empty [admin] listens on 127.0.0.1:8444 with TLS, 8 h sessions, a 10 s page refresh."""
    assert parse({}).admin == AdminConfig(listen="tcp:8444:interface=127.0.0.1", tls=True, session_lifetime=28800,
                                          page_refresh=10)


def test_no_admin_table_means_no_admin_listener():
    """Without [admin] the config says None (nothing listens)."""
    assert parse_config({"service": {"state_dir": "/tmp/s"}}, "/etc/gateway/gateway.toml").admin is None


@pytest.mark.parametrize("admin, service, key, words", [
    ({"tls": False, "listen": "tcp:8444"}, None, "admin.tls", "not on loopback"),
    ({"tls": "yes"}, None, "admin.tls", "true or false"),
    ({"listen": "tcp:8443"}, None, "admin.listen", "other than service.listen"),
    ({"listen": "ssl:8444"}, None, "admin.listen", "gateway adds TLS itself"),
    ({"session_lifetime": 10}, None, "admin.session_lifetime", "60..604800"),
    ({"page_refresh": 0}, None, "admin.page_refresh", "1..3600"),
    ({"colour": "red"}, None, "admin.colour", "unknown key"),
    ({}, False, "admin", "only together with a [service] table"),
])
def test_bad_admin_values_are_refused_naming_the_key(admin, service, key, words):
    """Plain HTTP off loopback, a non-boolean tls, the tunnel port, ranges, unknown keys, no [service]."""
    with pytest.raises(ConfigError) as raised:
        parse(admin, service) if service is not False else parse_config(
            {"admin": admin, "connector": {"state_dir": "/tmp/c"}}, "/etc/gateway/gateway.toml")
    assert raised.value.key == key
    assert words in str(raised.value)


def test_plain_http_is_allowed_on_loopback():
    """tls = false with a loopback interface (v4 or v6) is accepted, for a local reverse proxy."""
    assert parse({"tls": False, "listen": "tcp:8444:interface=127.0.0.1"}).admin.tls is False
    assert parse({"tls": False, "listen": r"tcp:8444:interface=\:\:1"}).admin.tls is False
