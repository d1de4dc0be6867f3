"""Tests for the [service] keys of a service of several nodes: advertise and store_outage_grace (issue 15)."""

from __future__ import annotations

import pytest

from gateway.config import ServiceConfig, parse_config
from gateway.errors import ConfigError

FILE = "/etc/gateway/svc.toml"


def service_config(**keys) -> ServiceConfig:
    """The ServiceConfig of a [service] table with state_dir and `keys`."""
    return parse_config({"service": {"state_dir": "/srv/gw", **keys}}, FILE).service


def config_error(**keys) -> ConfigError:
    """The ConfigError the [service] table with `keys` raises."""
    with pytest.raises(ConfigError) as info:
        service_config(**keys)
    return info.value


@pytest.mark.parametrize("keys, address", [
    ({}, "localhost:8443"),
    ({"listen": "tcp:9443:interface=127.0.0.1"}, "127.0.0.1:9443"),
    ({"listen": "tcp:9443:interface=0.0.0.0", "names": ["gw1.example.test"]}, "gw1.example.test:9443"),
    ({"listen": "tcp:9443:interface=192.0.2.7", "names": ["gw1.example.test"]}, "gw1.example.test:9443"),
    ({"names": ["::1"]}, "[::1]:8443"),
])
def test_advertise_defaults_to_the_tunnel_listen(keys, address):
    """Without advertise, connectors dial the listen's interface when the certificate names it, else names[0], on the listen's port."""
    config = service_config(**keys)
    assert (config.advertise, config.tunnel_address()) == ("", address)


def test_a_listen_on_port_0_advertises_the_port_it_got():
    """With listen "tcp:0" the node advertises the port the listener was given."""
    config = service_config(listen="tcp:0:interface=127.0.0.1")
    assert (config.tunnel_address(), config.tunnel_address(40123)) == ("", "127.0.0.1:40123")


def test_advertise_is_kept():
    """An advertise whose host the certificate names is taken as given."""
    config = service_config(names=["gw1.example.test"], advertise="gw1.example.test:443")
    assert config.advertise == "gw1.example.test:443" == config.tunnel_address(9999)


@pytest.mark.parametrize("value, words", [
    ("gw1.example.test", '"host:port"'),
    ("gw1.example.test:0", '"host:port"'),
    ("gw1.example.test:99999", '"host:port"'),
    ("other.example.test:8443", "add the host to service.names"),
    (8443, '"host:port"'),
    ("", '"host:port"'),
])
def test_bad_advertise_is_refused(value, words):
    """advertise must be host:port with a host the node certificate names, and the error names the key."""
    error = config_error(names=["gw1.example.test"], advertise=value)
    assert error.key == "service.advertise" and words in error.expected


def test_advertise_is_required_without_a_tcp_listen_on_a_shared_store():
    """With the tunnel port on a UNIX socket and a PostgreSQL store (other nodes) the key is required: the error says why."""
    error = config_error(listen="unix:/run/gw.sock", store="postgresql://gw@db.example.test/gw")
    assert error.key == "service.advertise" and "no TCP port" in error.expected
    assert service_config(listen="unix:/run/gw.sock").tunnel_address() == ""


def test_store_outage_grace_defaults_to_15_minutes_and_is_kept():
    """store_outage_grace is 900 s unless set; a value within 1 s .. 1 day is taken."""
    assert service_config().store_outage_grace == 900.0
    assert service_config(store_outage_grace=30).store_outage_grace == 30.0


@pytest.mark.parametrize("value", [0, -5, 86401, "15m", True])
def test_a_bad_store_outage_grace_is_refused(value):
    """store_outage_grace outside 1 s .. 1 day, or not a number, is refused naming the key and the range."""
    error = config_error(store_outage_grace=value)
    assert error.key == "service.store_outage_grace" and "86400" in error.expected
