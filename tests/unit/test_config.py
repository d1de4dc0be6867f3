"""Tests for gateway.config: loading, defaults and the error messages of every kind of mistake."""

from __future__ import annotations

import socket
from pathlib import Path

import attrs
import pytest

from gateway.config import (
    DEFAULT_CONFIG_PATH,
    AppConfig,
    ConnectorConfig,
    GatewayConfig,
    LoggingConfig,
    ServiceConfig,
    TunnelConfig,
    load_config,
    parse_config,
)
from gateway.errors import ConfigError, GatewayError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FILE = "conf/x.toml"


def service(**extra):
    """A minimal valid [service] table plus overrides."""
    return {"state_dir": "/srv/gw", **extra}


def app(**extra):
    """A minimal valid [[apps]] entry plus overrides."""
    return {"name": "web", "listen": "tcp:8080", "destination": "127.0.0.1:8000", "options": {"preauth": "none"},
            **extra}


def error_for(data, file=FILE) -> ConfigError:
    """Parse data, expecting a ConfigError, and return it."""
    with pytest.raises(ConfigError) as info:
        parse_config(data, file)
    return info.value


def write(tmp_path: Path, text: str, name: str = "gw.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# --- the shipped examples -------------------------------------------------------------------


def test_example_service_loads():
    """examples/service.toml is valid and its apps are parsed into host and port."""
    cfg = load_config(EXAMPLES / "service.toml")
    assert cfg.service is not None and cfg.connector is None
    assert cfg.service.state_dir == Path("/var/lib/gateway/service")
    assert [a.name for a in cfg.apps] == ["intranet-web", "postgres", "corp-ssh"]
    assert cfg.apps[2].is_private and cfg.access.tunnel == "gateway.example.com:8443"
    assert (cfg.apps[0].host, cfg.apps[0].port) == ("intranet.corp.example", 80)
    assert (cfg.apps[1].host, cfg.apps[1].port) == ("2001:db8::5", 5432)
    assert cfg.apps[1].group == "datacenter"
    assert cfg.logging.format == "json"


def test_example_connector_loads():
    """examples/connector.toml is valid and configures only a connector."""
    cfg = load_config(EXAMPLES / "connector.toml")
    assert cfg.service is None and cfg.apps == ()
    assert cfg.connector == ConnectorConfig(state_dir=Path("/var/lib/gateway/connector"))


def test_example_demo_loads_on_loopback():
    """examples/demo.toml is a service on 127.0.0.1:8443 with a web app http://demo.localhost:8080/, a
    tcp app 127.0.0.1:8081, both to 127.0.0.1:8000, and a private app of 127.0.0.1:8000 for demo-user."""
    from gateway import plugins

    cfg = load_config(EXAMPLES / "demo.toml", plugins.config_sections(plugins.make_plugin_manager({})))
    assert cfg.connector is None
    assert cfg.service.listen == "tcp:8443:interface=127.0.0.1"
    assert cfg.service.state_dir == (EXAMPLES.parent / ".demo" / "service")
    web, tcp, private = cfg.apps
    assert [str(s) for s in private.segments] == ["tcp 127.0.0.1:8000"]
    assert private.options["allowed_users"] == ["demo-user"] and cfg.access.tunnel == "127.0.0.1:8443"
    assert (web.protocol, web.external_url, web.listen) == ("http", "http://demo.localhost:8080/", "")
    assert tcp.listen == "tcp:8081:interface=127.0.0.1"
    for demo in (web, tcp):
        assert (demo.destination, demo.host, demo.port) == ("127.0.0.1:8000", "127.0.0.1", 8000)


# --- defaults and models --------------------------------------------------------------------


def test_service_defaults():
    """A [service] with only state_dir gets every documented default."""
    cfg = parse_config({"service": service()}, FILE)
    s = cfg.service
    assert s.listen == "tcp:8443"
    assert s.names == ("localhost", "127.0.0.1")
    assert s.node_id == socket.gethostname()
    assert (s.config_interval, s.heartbeat_interval) == (300, 15)
    assert (s.certificate_lifetime_days, s.token_lifetime, s.max_handshakes) == (90, 3600, 64)
    assert cfg.apps == ()


def test_connector_defaults():
    """A [connector] with only state_dir gets every documented default."""
    c = parse_config({"connector": {"state_dir": "/c"}}, FILE).connector
    assert (c.tunnels, c.drain_timeout, c.backoff_initial, c.backoff_max) == (2, 30, 1.0, 60.0)


def test_tunnel_and_logging_defaults():
    """Without [tunnel] and [logging] the documented defaults apply."""
    cfg = parse_config({"connector": {"state_dir": "/c"}}, FILE)
    assert cfg.tunnel == TunnelConfig(ping_interval=10, initial_window=262144, max_window=16777216,
                                      max_frame=65536, max_streams=20000)
    assert cfg.logging == LoggingConfig(format="text", level="info", admin_log=Path("/c/admin.log"),
                                        session_log_file=Path("/c/session.log"))
    assert (cfg.logging.session_log, cfg.logging.journald, cfg.logging.max_bytes, cfg.logging.max_files) == (
        False, False, 10 * 1024 * 1024, 5)


def test_logging_keys():
    """[logging] takes the log paths (relative to the file, "" turns the admin log off), the bound
    and the switches; wrong types and out-of-range bounds name the key."""
    cfg = parse_config({"service": service(), "logging": {
        "admin_log": "", "session_log": True, "session_log_file": "logs/s.log", "max_bytes": 65536,
        "max_files": 2, "journald": True, "journald_socket": "/tmp/j.sock"}}, FILE).logging
    assert cfg.admin_log is None and cfg.session_log and cfg.journald
    assert cfg.session_log_file == Path(FILE).absolute().parent / "logs/s.log"
    assert (cfg.max_bytes, cfg.max_files, cfg.journald_socket) == (65536, 2, "/tmp/j.sock")
    for key, value, expected in [("session_log", "yes", "true or false"), ("max_bytes", 100, "16384"),
                                 ("max_files", 0, "1..100"), ("admin_log", 3, "a file path"),
                                 ("journald_socket", "j.sock", "absolute")]:
        with pytest.raises(ConfigError, match=f"logging.{key}: .*{expected}"):
            parse_config({"service": service(), "logging": {key: value}}, FILE)


def test_app_defaults():
    """An app with only name, listen and destination gets group, protocol, timeout and options defaults."""
    (a,) = parse_config({"service": service(), "apps": [app()]}, FILE).apps
    assert (a.group, a.protocol, a.connect_timeout, a.options) == ("default", "tcp", 10, {"preauth": "none"})


def test_both_roles_in_one_file():
    """A file may configure a service and a connector together."""
    cfg = parse_config({"service": service(), "connector": {"state_dir": "/c"}}, FILE)
    assert isinstance(cfg.service, ServiceConfig) and isinstance(cfg.connector, ConnectorConfig)


def test_models_are_frozen():
    """The configuration values cannot be modified after loading."""
    cfg = parse_config({"service": service(), "apps": [app()]}, FILE)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.service.listen = "tcp:1"  # type: ignore[misc]
    assert isinstance(cfg, GatewayConfig) and isinstance(cfg.apps[0], AppConfig)
    assert isinstance(cfg.apps, tuple) and isinstance(cfg.service.names, tuple)


def test_relative_state_dir_is_relative_to_config_file(tmp_path):
    """A relative state_dir resolves against the config file's directory, not the working directory."""
    p = write(tmp_path, '[service]\nstate_dir = "state/svc"\n[connector]\nstate_dir = "../conn"\n')
    cfg = load_config(p)
    assert cfg.path == p
    assert cfg.service.state_dir == tmp_path / "state" / "svc"
    assert cfg.connector.state_dir == tmp_path.parent / "conn"
    assert cfg.service.state_dir.is_absolute()


def test_path_is_absolute_even_for_relative_file_name(tmp_path, monkeypatch):
    """GatewayConfig.path is absolute when the file was named relatively."""
    write(tmp_path, '[connector]\nstate_dir = "c"\n')
    monkeypatch.chdir(tmp_path)
    cfg = load_config("gw.toml")
    assert cfg.path == tmp_path / "gw.toml"
    assert cfg.connector.state_dir == tmp_path / "c"


def test_explicit_values_are_kept():
    """Explicit values in every section override the defaults."""
    cfg = parse_config({
        "service": service(listen="tcp:9443", names=["gw.example.com"], node_id="n2", config_interval=60,
                           heartbeat_interval=5.5, certificate_lifetime_days=30, token_lifetime=60,
                           max_handshakes=8),
        "connector": {"state_dir": "/c", "tunnels": 16, "drain_timeout": 0, "backoff_initial": 2,
                      "backoff_max": 2},
        "apps": [app(group="dc-1", protocol="http", connect_timeout=2.5, options={"preauth": "none", "k": [1, 2]})],
        "tunnel": {"ping_interval": 3, "initial_window": 65536, "max_window": 65536, "max_frame": 1024,
                   "max_streams": 5},
        "logging": {"format": "json", "level": "warn"},
    }, FILE)
    assert cfg.service.names == ("gw.example.com",) and cfg.service.node_id == "n2"
    assert cfg.service.heartbeat_interval == 5.5 and cfg.service.max_handshakes == 8
    assert cfg.connector.tunnels == 16 and cfg.connector.backoff_max == 2
    assert cfg.apps[0].options == {"preauth": "none", "k": [1, 2]} and cfg.apps[0].protocol == "http"
    assert cfg.tunnel.max_frame == 1024 and cfg.tunnel.max_window == 65536
    assert cfg.logging.level == "warn"


def test_ipv6_destination_is_unbracketed():
    """A "[v6]:port" destination yields the bare IPv6 host and keeps the original string."""
    (a,) = parse_config({"service": service(), "apps": [app(destination="[::1]:443")]}, FILE).apps
    assert (a.destination, a.host, a.port) == ("[::1]:443", "::1", 443)


def test_several_ephemeral_app_ports_do_not_conflict():
    """Apps listening on port 0 (ephemeral, used in tests) are not treated as duplicates."""
    cfg = parse_config({"service": service(listen="tcp:0"),
                        "apps": [app(name="a", listen="tcp:0"), app(name="b", listen="tcp:0")]}, FILE)
    assert len(cfg.apps) == 2


def test_default_config_path():
    """DEFAULT_CONFIG_PATH is an absolute path to a TOML file."""
    assert isinstance(DEFAULT_CONFIG_PATH, Path)
    assert DEFAULT_CONFIG_PATH.is_absolute() and DEFAULT_CONFIG_PATH.suffix == ".toml"


# --- file-level errors ----------------------------------------------------------------------


def test_missing_file(tmp_path):
    """A missing file raises ConfigError with key "(file)" naming the path."""
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    e = info.value
    assert e.file == str(missing) and e.key == "(file)"
    assert "no such file" in e.expected
    assert str(e).startswith(f"{missing}: (file): ")


def test_directory_instead_of_file(tmp_path):
    """Naming a directory raises ConfigError with key "(file)"."""
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.key == "(file)" and "directory" in info.value.expected


def test_syntax_error_reports_line_and_column(tmp_path):
    """A TOML syntax error raises ConfigError with key "(syntax)" and tomllib's line/column."""
    p = write(tmp_path, '[connector]\nstate_dir = "c"\ntunnels = = 2\n')
    with pytest.raises(ConfigError) as info:
        load_config(p)
    e = info.value
    assert e.file == str(p) and e.key == "(syntax)"
    assert "line 3" in e.expected and "column" in e.expected


def test_invalid_utf8_is_a_syntax_error(tmp_path):
    """Bytes that are not UTF-8 raise ConfigError "(syntax)" rather than UnicodeDecodeError."""
    p = tmp_path / "bad.toml"
    p.write_bytes(b'[connector]\nstate_dir = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert info.value.key == "(syntax)" and "UTF-8" in info.value.expected


def test_config_error_is_a_gateway_error():
    """ConfigError from the loader is catchable as GatewayError, with the documented str() format."""
    e = error_for({})
    assert isinstance(e, GatewayError)
    assert str(e) == f"{e.file}: {e.key}: {e.expected}"


def test_neither_role():
    """A file with neither [service] nor [connector] is refused, saying both are possible."""
    e = error_for({"tunnel": {}, "logging": {}})
    assert e.file == FILE and e.key == "service"
    assert "[service]" in e.expected and "[connector]" in e.expected and "got neither" in e.expected


def test_error_names_the_file_as_given(tmp_path):
    """The file in the error is the path exactly as the caller named it."""
    e = error_for({"connector": {"state_dir": "c", "tunnels": 0}}, "examples/x.toml")
    assert str(e).startswith("examples/x.toml: connector.tunnels: ")


# --- unknown keys ---------------------------------------------------------------------------


def test_unknown_key_suggests_closest():
    """A misspelt key is refused with a did-you-mean suggestion and its dotted key."""
    e = error_for({"connector": {"state_dir": "/c", "tunels": 3}})
    assert e.key == "connector.tunels"
    assert e.expected == 'unknown key "tunels"; did you mean "tunnels"?'


def test_unknown_key_without_close_match_lists_known_keys():
    """An unknown key with no close match lists the keys that are allowed."""
    e = error_for({"logging": {"zzz": 1}, "connector": {"state_dir": "/c"}})
    assert e.key == "logging.zzz"
    assert 'unknown key "zzz"' in e.expected and "format" in e.expected and "level" in e.expected


def test_unknown_top_level_table():
    """An unknown top-level table is refused with a suggestion."""
    e = error_for({"servce": {}, "connector": {"state_dir": "/c"}})
    assert e.key == "servce" and 'did you mean "service"?' in e.expected


@pytest.mark.parametrize("section,data,key", [
    ("service", {"service": service(listne="tcp:1")}, "service.listne"),
    ("apps", {"service": service(), "apps": [app(), app(name="b", listen="tcp:81", destnation="x:1")]},
     "apps[1].destnation"),
    ("tunnel", {"connector": {"state_dir": "/c"}, "tunnel": {"max_frames": 1}}, "tunnel.max_frames"),
])
def test_unknown_key_in_every_table(section, data, key):
    """Unknown keys are errors in [service], [[apps]] and [tunnel] too, with an indexed dotted key."""
    e = error_for(data)
    assert e.key == key and "unknown key" in e.expected and "did you mean" in e.expected


# --- required keys and types ----------------------------------------------------------------


def test_missing_state_dir():
    """[service] without state_dir is refused, saying the key is required."""
    e = error_for({"service": {}})
    assert e.key == "service.state_dir"
    assert "directory path" in e.expected and "required" in e.expected


def test_missing_app_destination():
    """An app without destination is refused with its index in the key."""
    d = app()
    del d["destination"]
    e = error_for({"service": service(), "apps": [d]})
    assert e.key == "apps[0].destination" and "required" in e.expected and "host:port" in e.expected


def test_boolean_is_not_an_integer():
    """TOML true is not accepted where an integer is expected."""
    e = error_for({"connector": {"state_dir": "/c", "tunnels": True}})
    assert e.key == "connector.tunnels"
    assert e.expected == "expected an integer 1..16, got true (a boolean)"


def test_boolean_is_not_a_number_of_seconds():
    """TOML true is not accepted where a duration is expected."""
    e = error_for({"connector": {"state_dir": "/c"}, "tunnel": {"ping_interval": True}})
    assert e.key == "tunnel.ping_interval" and "got true (a boolean)" in e.expected


def test_string_is_not_an_integer():
    """A quoted number is refused and shown as a string."""
    e = error_for({"service": service(max_handshakes="64")})
    assert e.key == "service.max_handshakes" and e.expected == 'expected an integer >= 1, got "64" (a string)'


def test_float_is_not_an_integer():
    """A float is refused where an integer is expected."""
    e = error_for({"service": service(certificate_lifetime_days=1.5)})
    assert e.key == "service.certificate_lifetime_days" and "got 1.5 (a float)" in e.expected


def test_infinite_duration_is_refused():
    """inf is not a usable number of seconds."""
    e = error_for({"service": service(config_interval=float("inf"))})
    assert e.key == "service.config_interval" and "> 0" in e.expected and "inf" in e.expected


def test_section_must_be_a_table():
    """A section given as a plain value is refused."""
    e = error_for({"service": "yes"})
    assert e.key == "service" and "table" in e.expected and '"yes"' in e.expected


def test_apps_must_be_array_of_tables():
    """apps given as a single table instead of [[apps]] is refused."""
    e = error_for({"service": service(), "apps": app()})
    assert e.key == "apps" and "[[apps]]" in e.expected


def test_options_must_be_a_table():
    """An app's options must be a table."""
    e = error_for({"service": service(), "apps": [app(options=[1])]})
    assert e.key == "apps[0].options" and "expected a table" in e.expected


# --- ranges ---------------------------------------------------------------------------------


@pytest.mark.parametrize("table,key,value,expected", [
    ("service", "config_interval", 0, "expected a number of seconds > 0, got 0 (an integer)"),
    ("service", "heartbeat_interval", -1, "expected a number of seconds > 0, got -1 (an integer)"),
    ("service", "certificate_lifetime_days", 3651, "expected an integer 1..3650, got 3651 (an integer)"),
    ("service", "certificate_lifetime_days", 0, "expected an integer 1..3650, got 0 (an integer)"),
    ("service", "token_lifetime", 0, "expected an integer >= 1, got 0 (an integer)"),
    ("service", "max_handshakes", 0, "expected an integer >= 1, got 0 (an integer)"),
    ("connector", "tunnels", 17, "expected an integer 1..16, got 17 (an integer)"),
    ("connector", "tunnels", 0, "expected an integer 1..16, got 0 (an integer)"),
    ("connector", "drain_timeout", -0.5, "expected a number of seconds >= 0, got -0.5 (a float)"),
    ("connector", "backoff_initial", 0, "expected a number of seconds > 0, got 0 (an integer)"),
    ("tunnel", "ping_interval", 0, "expected a number of seconds > 0, got 0 (an integer)"),
    ("tunnel", "initial_window", 65535, "expected an integer 65536..16777216, got 65535 (an integer)"),
    ("tunnel", "initial_window", 16777217, "expected an integer 65536..16777216, got 16777217 (an integer)"),
    ("tunnel", "max_window", 268435457, "got 268435457"),
    ("tunnel", "max_frame", 1023, "expected an integer 1024..1048576, got 1023 (an integer)"),
    ("tunnel", "max_frame", 1048577, "expected an integer 1024..1048576, got 1048577 (an integer)"),
    ("tunnel", "max_streams", 0, "got 0 (an integer)"),
])
def test_out_of_range_values(table, key, value, expected):
    """Each bounded number is refused outside its range, with the range and the value in the message."""
    data = {"service": service(), "connector": {"state_dir": "/c"}}
    data.setdefault(table, {})[key] = value
    e = error_for(data)
    assert e.key == f"{table}.{key}"
    assert expected in e.expected


def test_range_boundaries_are_accepted():
    """The documented bounds themselves are valid values."""
    cfg = parse_config({
        "service": service(certificate_lifetime_days=3650),
        "connector": {"state_dir": "/c", "tunnels": 1},
        "tunnel": {"initial_window": 16777216, "max_window": 268435456, "max_frame": 1048576},
    }, FILE)
    assert cfg.tunnel.max_window == 268435456 and cfg.connector.tunnels == 1


def test_max_window_below_initial_window():
    """max_window smaller than initial_window is refused, naming initial_window's value."""
    e = error_for({"connector": {"state_dir": "/c"},
                   "tunnel": {"initial_window": 1048576, "max_window": 524288}})
    assert e.key == "tunnel.max_window"
    assert ">= initial_window (1048576)" in e.expected and "got 524288" in e.expected


def test_backoff_max_below_backoff_initial():
    """backoff_max smaller than backoff_initial is refused."""
    e = error_for({"connector": {"state_dir": "/c", "backoff_initial": 10, "backoff_max": 5}})
    assert e.key == "connector.backoff_max"
    assert ">= backoff_initial (10)" in e.expected and "got 5" in e.expected


# --- strings with a grammar -----------------------------------------------------------------


@pytest.mark.parametrize("destination", [
    "db.corp", "db.corp:0", "db.corp:65536", "db.corp:http", ":80", "::1:80", "[::1]80", "[db.corp]:80",
    "[127.0.0.1]:80", "db corp:80", "db.corp:-1",
])
def test_bad_destination(destination):
    """Malformed destinations are refused with the expected form and the value found."""
    e = error_for({"service": service(), "apps": [app(destination=destination)]}, "examples/x.toml")
    assert e.key == "apps[0].destination"
    assert '"host:port"' in e.expected and "1..65535" in e.expected
    assert f'got "{destination}"' in e.expected


def test_destination_message_matches_documented_form():
    """The destination error reads file: key: expected ..., got "value"."""
    e = error_for({"service": service(), "apps": [app(), app(name="b", listen="tcp:81"),
                                                   app(name="c", listen="tcp:82", destination="db.corp")]},
                  "examples/x.toml")
    assert str(e) == ('examples/x.toml: apps[2].destination: expected "host:port" (or "[v6]:port") '
                      'with a port 1..65535, got "db.corp"')


def test_destination_must_be_a_string():
    """A destination that is not a string is refused."""
    e = error_for({"service": service(), "apps": [app(destination=8000)]})
    assert e.key == "apps[0].destination" and "got 8000 (an integer)" in e.expected


@pytest.mark.parametrize("name", ["Web", "-web", "", "a" * 64, "web app", "wéb"])
def test_bad_app_name(name):
    """App names must match [a-z0-9][a-z0-9._-]{0,62}."""
    e = error_for({"service": service(), "apps": [app(name=name)]})
    assert e.key == "apps[0].name" and "[a-z0-9][a-z0-9._-]{0,62}" in e.expected


def test_longest_app_name_is_accepted():
    """A 63-character name is the longest valid app name."""
    (a,) = parse_config({"service": service(), "apps": [app(name="a" * 63)]}, FILE).apps
    assert a.name == "a" * 63


def test_bad_group_and_protocol():
    """group and protocol must be simple names."""
    assert error_for({"service": service(), "apps": [app(group="Bad Group")]}).key == "apps[0].group"
    assert error_for({"service": service(), "apps": [app(protocol="")]}).key == "apps[0].protocol"


@pytest.mark.parametrize("names,key", [
    ([], "service.names"),
    ("localhost", "service.names"),
    (["localhost", 5], "service.names[1]"),
    (["bad name"], "service.names[0]"),
    (["-bad.example"], "service.names[0]"),
])
def test_bad_names(names, key):
    """names must be a non-empty array of DNS names or IP addresses."""
    e = error_for({"service": service(names=names)})
    assert e.key == key and "DNS name" in e.expected


def test_ip_names_are_accepted():
    """IPv4 and IPv6 addresses are valid certificate names."""
    s = parse_config({"service": service(names=["::1", "10.0.0.1", "gw.example.com"])}, FILE).service
    assert s.names == ("::1", "10.0.0.1", "gw.example.com")


@pytest.mark.parametrize("node_id", ["", "node 1", 5])
def test_bad_node_id(node_id):
    """node_id must be a non-empty string without spaces."""
    e = error_for({"service": service(node_id=node_id)})
    assert e.key == "service.node_id" and "non-empty string" in e.expected


@pytest.mark.parametrize("table,key,value", [
    ("logging", "format", "xml"),
    ("logging", "level", "warning"),
    ("logging", "level", "INFO"),
])
def test_bad_logging_choice(table, key, value):
    """logging.format and logging.level accept only the documented words."""
    e = error_for({"connector": {"state_dir": "/c"}, table: {key: value}})
    assert e.key == f"{table}.{key}" and "one of" in e.expected and f'got "{value}"' in e.expected


# --- endpoints ------------------------------------------------------------------------------


def test_ssl_endpoint_refused_with_explanation():
    """An "ssl:" listen string is refused, explaining that gateway adds TLS itself."""
    e = error_for({"service": service(listen="ssl:8443:privateKey=k.pem")})
    assert e.key == "service.listen"
    assert 'not "ssl:"' in e.expected and "adds TLS itself" in e.expected
    assert 'got "ssl:8443:privateKey=k.pem"' in e.expected


@pytest.mark.parametrize("listen,detail", [
    ("bogus:1", "Unknown endpoint type"),
    ("tcp:abc", "invalid literal"),
    ("tcp:8080:colour=red", "colour"),
    ("tcp:8080:interface=::1", "escaped"),
])
def test_bad_endpoint_strings(listen, detail):
    """Unparseable endpoint strings are refused with Twisted's reason, for apps and the service."""
    e = error_for({"service": service(), "apps": [app(listen=listen)]})
    assert e.key == "apps[0].listen"
    assert "Twisted server endpoint string" in e.expected and detail in e.expected
    assert e.expected.count(listen) >= 1
    e2 = error_for({"service": service(listen=listen)})
    assert e2.key == "service.listen" and detail in e2.expected


def test_tcp_port_out_of_range_in_endpoint():
    """A TCP port above 65535 in an endpoint string is refused."""
    e = error_for({"service": service(listen="tcp:70000")})
    assert e.key == "service.listen" and "0..65535" in e.expected


def test_escaped_ipv6_interface_is_accepted():
    """An IPv6 interface with escaped colons is a valid listen endpoint."""
    cfg = parse_config({"service": service(listen=r"tcp6:8443:interface=\:\:1")}, FILE)
    assert cfg.service.listen == r"tcp6:8443:interface=\:\:1"


def test_checking_endpoints_binds_nothing():
    """Validating a listen endpoint does not bind the port (the same port can be bound afterwards)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    parse_config({"service": service(listen=f"tcp:{port}:interface=127.0.0.1")}, FILE)
    s2 = socket.socket()
    try:
        s2.bind(("127.0.0.1", port))
    finally:
        s2.close()


# --- apps consistency -----------------------------------------------------------------------


def test_apps_without_service():
    """[[apps]] without [service] is refused."""
    e = error_for({"connector": {"state_dir": "/c"}, "apps": [app()]})
    assert e.key == "apps" and "[service]" in e.expected and "got 1 app" in e.expected


def test_duplicate_app_names():
    """Two apps with the same name are refused, naming the first one."""
    e = error_for({"service": service(), "apps": [app(), app(listen="tcp:8081")]})
    assert e.key == "apps[1].name" and "unique" in e.expected and "apps[0]" in e.expected
    assert 'got "web"' in e.expected


def test_duplicate_listen_endpoints():
    """Two apps on the same listen endpoint are refused."""
    e = error_for({"service": service(), "apps": [app(), app(name="b")]})
    assert e.key == "apps[1].listen" and "unique" in e.expected and "apps[0].listen" in e.expected


def test_duplicate_listen_written_differently():
    """The same TCP port written two ways (all interfaces vs one interface) is still a conflict."""
    e = error_for({"service": service(), "apps": [app(listen="tcp:port=8080"),
                                                   app(name="b", listen="tcp:8080:interface=127.0.0.1")]})
    assert e.key == "apps[1].listen"


def test_same_port_on_different_interfaces_is_allowed():
    """The same port on two specific, different interfaces does not conflict."""
    cfg = parse_config({"service": service(), "apps": [app(listen="tcp:8080:interface=127.0.0.1"),
                                                        app(name="b", listen="tcp:8080:interface=127.0.0.2")]},
                       FILE)
    assert len(cfg.apps) == 2


def test_app_listen_equal_to_service_listen():
    """An app may not listen on the tunnel listener's endpoint."""
    e = error_for({"service": service(listen="tcp:8443"), "apps": [app(listen="tcp:8443")]})
    assert e.key == "apps[0].listen" and "service.listen" in e.expected and 'got "tcp:8443"' in e.expected


def test_app_listen_overlapping_service_listen():
    """An app on the service's port on a specific interface still overlaps a wildcard service listen."""
    e = error_for({"service": service(), "apps": [app(listen="tcp:8443:interface=127.0.0.1")]})
    assert e.key == "apps[0].listen" and "service.listen" in e.expected


def test_first_error_in_second_app_is_indexed():
    """Errors inside [[apps]] carry the index of the offending entry."""
    e = error_for({"service": service(), "apps": [app(), app(name="b", listen="tcp:81", connect_timeout=0)]})
    assert e.key == "apps[1].connect_timeout" and "> 0" in e.expected


def test_load_config_from_toml_text(tmp_path):
    """load_config reads a TOML file end to end, including inline option tables."""
    p = write(tmp_path, """
[service]
state_dir = "s"
[[apps]]
name = "web"
listen = "tcp:8080"
destination = "web.corp:80"
options = { preauth = "none", header = "x", nested = { a = 1 } }
[[apps]]
name = "db"
listen = "tcp:5432"
destination = "db.corp:5432"
options.preauth = "none"
""")
    cfg = load_config(str(p))
    assert [a.name for a in cfg.apps] == ["web", "db"]
    assert cfg.apps[0].options == {"preauth": "none", "header": "x", "nested": {"a": 1}}


def test_toml_error_through_load_config_names_the_key(tmp_path):
    """Validation errors from load_config name the file and the dotted key."""
    p = write(tmp_path, '[connector]\nstate_dir = "c"\ntunnels = true\n')
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert str(info.value) == f"{p}: connector.tunnels: expected an integer 1..16, got true (a boolean)"
