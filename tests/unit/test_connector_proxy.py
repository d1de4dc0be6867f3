"""The forward proxy pieces without sockets: proxy URLs, NO_PROXY, which proxy is chosen, the
CONNECT exchange over a StringTransport, and the [connector] proxy keys of the config file."""

from __future__ import annotations

import base64
import tomllib
from pathlib import Path

import pytest
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport

from gateway.config import parse_config
from gateway.connector.proxy import (
    MAX_ANSWER_HEAD,
    ConnectEndpoint,
    ProxyError,
    ProxySettings,
    bypassed,
    choose_proxy,
    connect_request,
    parse_proxy_url,
    untrusted_certificate_message,
)
from gateway.errors import ConfigError


def test_proxy_urls_are_read_as_curl_reads_them():
    """http://user@host:port gives host, port and user; a bare host:port is http; the default port is 3128."""
    url = parse_proxy_url("http://gw%40corp@proxy.corp:8080")
    assert (url.host, url.port, url.username) == ("proxy.corp", 8080, "gw@corp")
    assert parse_proxy_url("proxy.corp:3129").port == 3129
    assert parse_proxy_url("http://[::1]").address == "[::1]:3128"


@pytest.mark.parametrize("text, expected", [
    ("https://proxy:3128", "not https://"),
    ("socks5://proxy:1080", "not socks5://"),
    ("http://:3128", "with a host"),
    ("http://proxy:3128/path", "without a path"),
    ("http://proxy:99999", "proxy URL"),
])
def test_unusable_proxy_urls_are_refused_saying_what_is_expected(text, expected):
    """A proxy URL that is not plain http://HOST:PORT is refused with what was expected."""
    with pytest.raises(ValueError, match=expected):
        parse_proxy_url(text)


def test_a_password_in_the_configured_url_is_refused_without_echoing_it():
    """The config may not hold the proxy password (proxy_password_file does); the error never repeats it."""
    with pytest.raises(ValueError) as e:
        parse_proxy_url("http://gw:hunter2@proxy:3128")
    assert "proxy_password_file" in str(e.value) and "hunter2" not in str(e.value)
    assert parse_proxy_url("http://gw:hunter2@proxy:3128", allow_password=True).password == "hunter2"


@pytest.mark.parametrize("no_proxy, host, port, expected", [
    ("*", "gw.example.com", 8443, True),
    ("example.com", "gw.example.com", 8443, True),
    (".example.com", "gw.example.com", 8443, True),
    ("*.example.com", "example.com", 8443, True),
    ("ample.com", "gw.example.com", 8443, False),
    ("localhost, 10.0.0.0/8", "10.1.2.3", 8443, True),
    ("10.0.0.0/8", "gw.example.com", 8443, False),
    ("gw.example.com:443", "gw.example.com", 8443, False),
    ("gw.example.com:8443", "GW.Example.com.", 8443, True),
    ("[::1]:8443", "::1", 8443, True),
    ("", "gw.example.com", 8443, False),
])
def test_no_proxy_entries_match_hosts_domains_networks_and_ports(no_proxy, host, port, expected):
    """NO_PROXY matches a host, its subdomains, an address in a network, an optional port, and * for all."""
    assert bypassed(no_proxy, host, port) is expected


def test_the_config_wins_over_the_environment_and_empty_means_direct(tmp_path):
    """[connector] proxy is used as set; "" dials directly whatever HTTPS_PROXY says; None follows it."""
    env = {"HTTPS_PROXY": "http://env-proxy:3128"}
    chosen = choose_proxy("http://conf-proxy:8080", None, "gw.example.com", 8443, env)
    assert (chosen.address, chosen.source) == ("conf-proxy:8080", "[connector] proxy")
    assert choose_proxy("", None, "gw.example.com", 8443, env) is None
    assert choose_proxy(None, None, "gw.example.com", 8443, env).source == "HTTPS_PROXY"
    assert choose_proxy(None, None, "gw.example.com", 8443, {**env, "https_proxy": "http://low:1"}).address == "low:1"
    assert choose_proxy(None, None, "gw.example.com", 8443, {**env, "NO_PROXY": ".example.com"}) is None
    assert choose_proxy(None, None, "gw.example.com", 8443, {}) is None


def test_the_password_comes_from_its_file_and_an_unreadable_one_stops_the_start(tmp_path):
    """The password file's first line is the Basic password; a missing or empty file is a ProxyError naming it."""
    secret = tmp_path / "proxy.pw"
    secret.write_text("s3cret\n")
    chosen = choose_proxy("http://gw@proxy:3128", secret, "svc", 8443, {})
    assert chosen.credentials() == ("gw", "s3cret")
    with pytest.raises(ProxyError, match=f"cannot read the proxy password file {tmp_path}/missing"):
        choose_proxy("http://gw@proxy:3128", tmp_path / "missing", "svc", 8443, {})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ProxyError, match="is empty"):
        choose_proxy("http://gw@proxy:3128", tmp_path / "empty", "svc", 8443, {})
    with pytest.raises(ProxyError, match="names no user"):
        choose_proxy(None, secret, "svc", 8443, {"HTTPS_PROXY": "http://proxy:3128"})
    with pytest.raises(ProxyError, match="HTTPS_PROXY is not a usable proxy"):
        choose_proxy(None, None, "svc", 8443, {"HTTPS_PROXY": "https://proxy:3128"})


# -- the CONNECT exchange --------------------------------------------------------------------


class Recorder(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.made = False

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data


def _dial(settings: ProxySettings, reactor: MemoryReactorClock | None = None):
    """Connect through ``settings`` on a memory reactor; returns (reactor, result Deferred, proxy-side transport, protocol)."""
    reactor = reactor or MemoryReactorClock()
    endpoint = ConnectEndpoint(reactor, settings, "gw.example.com", 8443, timeout=5)
    d = endpoint.connect(Factory.forProtocol(Recorder))
    host, port, factory, _, _ = reactor.tcpClients[0]
    assert port == 3128   # (the memory reactor resolves every name to 127.0.0.1)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return reactor, d, transport, proto


def _settings(url: str = "http://proxy.corp:3128", password_file: Path | None = None) -> ProxySettings:
    return ProxySettings(url=parse_proxy_url(url), source="[connector] proxy", password_file=password_file)


def _result(d):
    box = []
    d.addBoth(box.append)
    return box[0] if box else None


def test_connect_asks_for_the_service_with_basic_credentials_and_hands_over_the_tunnel(tmp_path):
    """CONNECT names the service with Proxy-Authorization; after 200 the caller's protocol gets every later byte."""
    secret = tmp_path / "pw"
    secret.write_text("s3cret")
    _, d, transport, proto = _dial(_settings("http://gw@proxy.corp:3128", secret))
    request = transport.value().decode()
    assert request.startswith("CONNECT gw.example.com:8443 HTTP/1.1\r\nHost: gw.example.com:8443\r\n")
    assert f"Proxy-Authorization: Basic {base64.b64encode(b'gw:s3cret').decode()}\r\n" in request
    proto.dataReceived(b"HTTP/1.1 200 Connection established\r\nVia: x\r\n\r\nserver-")
    tunnel = _result(d)
    assert isinstance(tunnel, Recorder) and tunnel.made
    proto.dataReceived(b"hello")
    assert tunnel.received == b"server-hello"


@pytest.mark.parametrize("host", ["gw.example.com\r\nX-Injected: 1", "gw example", "", "gw.example.com/x"])
def test_a_service_host_that_is_no_name_never_reaches_the_request_line(host):
    """A host with CR LF, spaces or slashes is refused before anything is written to the proxy."""
    with pytest.raises(ProxyError, match="must be a DNS name or an IP address"):
        connect_request(host, 8443, None)
    assert connect_request("::1", 8443, None).startswith(b"CONNECT [::1]:8443 HTTP/1.1\r\n")


@pytest.mark.parametrize("answer, expected", [
    (b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
     "the proxy at proxy.corp:3128 ([connector] proxy) asks for credentials ('HTTP/1.1 407 Proxy Authentication"
     " Required'): name the user in the proxy URL"),
    (b"HTTP/1.1 403 Forbidden\r\n\r\n", "refused to open a tunnel to the service at gw.example.com:8443 (403"),
    (b"HTTP/1.0 502 Bad Gateway\r\n\r\n", "answered CONNECT to gw.example.com:8443 with 'HTTP/1.0 502 Bad Gateway'"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", "did not answer CONNECT in HTTP"),
])
def test_a_refused_connect_fails_naming_the_proxy_and_what_to_do(answer, expected):
    """A non-2xx answer fails the connection with a ProxyError naming the proxy; nothing reaches the caller."""
    _, d, transport, proto = _dial(_settings())
    proto.dataReceived(answer)
    failure = _result(d)
    assert failure.check(ProxyError) and expected in str(failure.value)
    assert transport.disconnecting or transport.disconnected


def test_an_endless_answer_head_is_cut_at_its_bound():
    """A proxy answer head longer than MAX_ANSWER_HEAD fails the connection instead of growing a buffer."""
    _, d, transport, proto = _dial(_settings())
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nX: " + b"a" * (MAX_ANSWER_HEAD + 1))
    assert "without ending its answer" in str(_result(d).value)


def test_a_proxy_that_never_answers_times_out():
    """No answer to CONNECT within the timeout fails the connection, naming the proxy and the wait."""
    reactor, d, transport, proto = _dial(_settings())
    reactor.advance(4.9)
    assert not d.called
    reactor.advance(0.1)
    assert "did not answer CONNECT to gw.example.com:8443 within 5s" in str(_result(d).value)


def test_a_proxy_closing_before_its_answer_is_reported():
    """The proxy closing the connection before answering fails it with that reason."""
    _, d, _, proto = _dial(_settings())
    proto.connectionLost(None)
    assert "closed the connection before answering CONNECT" in str(_result(d).value)


def test_the_inspection_message_names_the_proxy_the_issuer_and_the_fix():
    """Through a proxy the message blames the proxy and asks for an exception; without one it names the address."""
    message = untrusted_certificate_message(None, _settings(), "gw.example.com:8443")
    assert message.startswith("the proxy at proxy.corp:3128 replaced the service's certificate")
    assert "add an exception for the service's host gw.example.com:8443" in message
    assert untrusted_certificate_message(None, None, "gw.example.com:8443").startswith(
        "the service at gw.example.com:8443 presented a certificate")


# -- the config keys -----------------------------------------------------------------------


def _connector(tmp_path: Path, extra: str):
    return parse_config(tomllib.loads(f'[connector]\nstate_dir = "{tmp_path}"\n{extra}\n'), tmp_path / "c.toml")


def test_proxy_keys_are_read_with_the_password_file_relative_to_the_config(tmp_path):
    """proxy and proxy_password_file are read; a relative password file is taken from the config's directory."""
    config = _connector(tmp_path, 'proxy = "http://gw@proxy:3128"\nproxy_password_file = "pw"')
    assert config.connector.proxy == "http://gw@proxy:3128"
    assert config.connector.proxy_password_file == tmp_path / "pw"
    assert _connector(tmp_path, "").connector.proxy is None
    assert _connector(tmp_path, 'proxy = ""').connector.proxy == ""


@pytest.mark.parametrize("extra, expected", [
    ('proxy = "https://proxy:3128"', "connector.proxy: expected an http:// proxy URL"),
    ('proxy = "http://gw:hunter2@proxy:3128"', "connector.proxy: expected a proxy URL without a password"),
    ("proxy = 3128", "connector.proxy: expected an http://[USER@]HOST:PORT proxy URL"),
    ('proxy = "http://proxy:3128"\nproxy_password_file = "pw"', "connector.proxy_password_file: expected only"),
    ('proxy_password_file = ""', "connector.proxy_password_file: expected a file path"),
])
def test_bad_proxy_keys_are_refused_naming_the_key(tmp_path, extra, expected):
    """A bad proxy or proxy_password_file is a ConfigError naming the key, never echoing a password."""
    with pytest.raises(ConfigError) as e:
        _connector(tmp_path, extra)
    assert expected in str(e.value) and "hunter2" not in str(e.value)
