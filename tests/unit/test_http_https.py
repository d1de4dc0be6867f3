"""The HTTPS front door: certificate files, the SNI certificate store, TLS settings, the [http] TLS keys."""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, timedelta

import pytest
from attrs import frozen
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory

from gateway.errors import GatewayError
from gateway_http import https
from components import by_nature_if
from testca import CA

NOW = datetime.now(UTC)


@frozen
class App:
    name: str
    external_url: str


@pytest.fixture
def ca(tmp_path):
    return CA(tmp_path)


class Refused(Exception):
    pass


def error(key, expected):
    return Refused(f"http.{key}: {expected}")


def parse(table):
    return https.parse_section(table, error)


def served(ca, *specs) -> dict:
    """[http] with tls_listen and one certificate per (label, names)."""
    return parse({"tls_listen": "tcp:8443", "certificates": [
        ca.issue(label, names).as_table() for label, names in specs]})


def common_name(cert) -> str:
    return cert.to_cryptography().subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


# -- the store ---------------------------------------------------------------------------------


def test_sni_picks_the_certificate_exact_beats_wildcard(ca):
    """SNI picks by SAN: an exact name beats a wildcard, a wildcard covers one label; else the default."""
    store = served(ca, ("first", ["a.example.test"]), ("star", ["*.apps.example.test"]),
                   ("wiki", ["wiki.apps.example.test", "WIKI2.apps.example.test."]))["certificates"]
    label = {e.cert_path: e.leaf.subject.rfc4514_string() for e in store.entries}
    for sni, expected in ((b"a.example.test", "first"), (b"A.EXAMPLE.TEST.", "first"),
                          (b"wiki.apps.example.test", "wiki"), (b"wiki2.apps.example.test", "wiki"),
                          (b"crm.apps.example.test", "star"), (b"x.crm.apps.example.test", "first"),
                          (b"apps.example.test", "first"), (b"unknown.test", "first"), (None, "first")):
        assert label[store.choose(sni).cert_path] == f"CN={expected}", sni
    assert store.lookup("*.apps.example.test").cert_path.endswith("star.crt")
    assert store.lookup("*.example.test") is None


def test_default_certificate_is_configurable(ca):
    """default_certificate names the cert file of an entry; anything else is refused."""
    a, b = ca.issue("a", ["a.example.test"]), ca.issue("b", ["b.example.test"])
    table = {"tls_listen": "tcp:8443", "certificates": [{"cert": a[0], "key": a[1]}, {"cert": b[0], "key": b[1]}]}
    assert parse({**table, "default_certificate": b[0]})["certificates"].choose(None).cert_path == b[0]
    with pytest.raises(Refused, match=r"http.default_certificate: expected the cert path of one"):
        parse({**table, "default_certificate": "/nowhere.crt"})


def test_of_two_certificates_for_a_name_the_valid_one_expiring_last_wins(ca):
    """A renewed certificate beside the old one is served; an expired or future one loses to a valid one."""
    old, new = ca.issue("old", ["a.example.test"], days=5), ca.issue("new", ["a.example.test"], days=60)
    gone = ca.issue("gone", ["a.example.test"], days=-1, start_days=-10)
    future = ca.issue("future", ["a.example.test"], days=90, start_days=2)
    store = parse({"tls_listen": "tcp:8443", "certificates": [
        {"cert": c, "key": k} for c, k in (gone, old, future, new)]})["certificates"]
    assert store.choose(b"a.example.test").cert_path == new[0]
    assert store.default.cert_path == gone[0]  # the first entry, as configured


# -- files and config errors -------------------------------------------------------------------


def test_certificate_file_errors_name_the_file_and_the_fix(ca, tmp_path):
    """Missing, non-PEM, mismatched, encrypted and SAN-less files are refused with what to do."""
    cert, key = ca.issue("a", ["a.example.test"])
    _, other_key = ca.issue("b", ["b.example.test"])
    (tmp_path / "junk").write_bytes(b"not pem")
    enc = tmp_path / "enc.key"
    enc.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw")))
    nosan = ca.issue("nosan", [])
    cases = [
        ((str(tmp_path / "missing.crt"), key), "certificate file .*missing.crt does not exist"),
        ((cert, str(tmp_path / "missing.key")), "key file .*missing.key does not exist"),
        ((str(tmp_path / "junk"), key), "holds no PEM certificate"),
        ((cert, str(tmp_path / "junk")), "key file .*junk holds no PEM private key"),
        ((cert, other_key), "does not belong to the certificate"),
        ((cert, str(enc)), "is encrypted"),
        ((cert, str(tmp_path)), "key file .* cannot be read: Is a directory"),
        (nosan, "names no DNS name in its subjectAltName"),
    ]
    for (c, k), message in cases:
        with pytest.raises(Refused, match=r"http.certificates\[0\]: expected a readable certificate") as info:
            parse({"tls_listen": "tcp:8443", "certificates": [{"cert": c, "key": k}]})
        assert re.search(message, str(info.value)), (message, str(info.value))
    assert "BEGIN" not in str(info.value)


@by_nature_if(os.geteuid() == 0, "root reads any file")
def test_an_unreadable_key_is_refused(ca):
    """A key the service cannot read is a config error saying to grant read access."""
    cert, key = ca.issue("a", ["a.example.test"])
    os.chmod(key, 0)
    with pytest.raises(Refused, match="is not readable by this user"):
        parse({"tls_listen": "tcp:8443", "certificates": [{"cert": cert, "key": key}]})


def test_tls_keys_are_checked(ca):
    """tls_listen, redirect_to_https and certificates must make sense together."""
    cert, key = ca.issue("a", ["a.example.test"])
    certs = [{"cert": cert, "key": key}]
    assert parse({}) == {"tls_listen": None, "redirect_to_https": False, "certificates": None}
    parsed = parse({"tls_listen": "tcp:8443", "certificates": certs})
    assert parsed["redirect_to_https"] is True and parsed["tls_listen"] == "tcp:8443"
    assert parse({"tls_listen": "tcp:8443", "certificates": certs, "redirect_to_https": False})[
        "redirect_to_https"] is False
    for table, message in (
        ({"tls_listen": "tcp:8443"}, "http.certificates: expected at least one"),
        ({"tls_listen": "nonsense:1", "certificates": certs}, "http.tls_listen: expected a Twisted server endpoint"),
        ({"tls_listen": 443, "certificates": certs}, "http.tls_listen: expected"),
        ({"tls_listen": "ssl:443", "certificates": certs}, "expected a plain endpoint"),
        ({"certificates": certs}, "http.certificates: expected tls_listen to be set too"),
        ({"redirect_to_https": True}, "http.redirect_to_https: expected tls_listen"),
        ({"tls_listen": "tcp:8443", "certificates": certs, "redirect_to_https": "yes"}, "expected true or false"),
        ({"tls_listen": "tcp:8443", "certificates": {"cert": cert}}, "http.certificates: expected an array"),
        ({"tls_listen": "tcp:8443", "certificates": [{"cert": cert, "key": key, "pass": "x"}]},
         r"http.certificates\[0\].pass: unknown key"),
        ({"tls_listen": "tcp:8443", "certificates": [{"cert": "rel.crt", "key": key}]},
         r"http.certificates\[0\].cert: expected the absolute path"),
    ):
        with pytest.raises(Refused, match=message):
            parse(table)


def test_the_store_repr_and_log_lines_hold_no_key(ca):
    """No key material in the store's repr, nor in what the https listener logs."""
    cert, key = ca.issue("a", ["a.example.test"])
    section = parse({"tls_listen": "tcp:8443", "certificates": [{"cert": cert, "key": key}]})
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        https.register_listeners(lambda *a: None, section, lambda scheme: object(), None,
                                 [App("x", "https://uncovered.example.test/")])
    finally:
        globalLogPublisher.removeObserver(events.append)
    key_text = open(key).read()
    secret_line = key_text.splitlines()[1]
    text = repr(section) + "".join(repr(e) for e in events)
    assert secret_line not in text and "PRIVATE" not in text
    assert "a.crt" in repr(section)


# -- coverage warnings and registration --------------------------------------------------------


def test_coverage_warnings_name_the_app_and_host(ca):
    """An https app whose host no certificate covers, and an expired certificate, are warned about."""
    store = served(ca, ("star", ["*.apps.example.test"]), ("a", ["a.example.test"]))["certificates"]
    apps = [App("wild", "https://*.apps.example.test/"), App("crm", "https://crm.apps.example.test/x/"),
            App("a", "https://a.example.test/"), App("lost", "https://lost.example.test:8443/"),
            App("deep", "https://*.x.apps.example.test/"), App("plain", "http://plain.example.test/")]
    warnings = https.check_coverage(store, apps)
    assert len(warnings) == 2, warnings
    assert "app lost: no certificate covers its host lost.example.test" in warnings[0]
    assert "app deep: no certificate covers its host *.x.apps.example.test" in warnings[1]
    assert https.check_coverage(store, [], NOW + timedelta(days=11))[0].startswith(
        f"certificate {store.entries[0].cert_path} (*.apps.example.test) expired on")


def test_https_apps_need_tls_listen(ca):
    """An https app with no tls_listen is an error at start naming the app; with it, https is registered."""
    with pytest.raises(GatewayError, match="app wiki has an https external_url .* tls_listen is not set"):
        https.register_listeners(lambda *a: None, parse({}), lambda s: None, None,
                                 [App("wiki", "https://wiki.example.test/")])
    registered = []
    https.register_listeners(lambda *a: registered.append(a), parse({}), lambda s: None, None,
                             [App("wiki", "http://wiki.example.test/")])
    assert registered == []
    section = served(ca, ("a", ["wiki.example.test"]))
    https.register_listeners(lambda *a: registered.append(a), section, lambda s: ("door", s), None,
                             [App("wiki", "https://wiki.example.test/")])
    [(name, endpoint, factory)] = registered
    assert (name, endpoint) == ("https", "tcp:8443")
    assert isinstance(factory, TLSMemoryBIOFactory) and factory.wrappedFactory == ("door", "https")


# -- real handshakes in memory -----------------------------------------------------------------


def handshake(options: https.SNIServerOptions, client_ctx: SSL.Context, sni: bytes | None):
    """Run a TLS handshake between ``options`` and a client over memory BIOs; return both ends."""
    server = options.serverConnectionForTLS(None)
    server.set_accept_state()
    client = SSL.Connection(client_ctx, None)
    if sni:
        client.set_tlsext_host_name(sni)
    client.set_connect_state()
    for _ in range(10):
        for a, b in ((client, server), (server, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error:
                return client, server  # refused: the caller looks at what the client got
            try:
                data = a.bio_read(65536)
            except SSL.WantReadError:
                data = b""
            if data:
                b.bio_write(data)
    return client, server


def client_context(ca: CA, max_version: int | None = None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_alpn_protos([b"h2", b"http/1.1"])
    ctx.get_cert_store().add_cert(crypto.X509.from_cryptography(ca.cert))
    ctx.set_verify(SSL.VERIFY_PEER, lambda *a: a[-1])
    if max_version is not None:
        ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")  # let the client offer old TLS: the server must refuse
        ctx.set_max_proto_version(max_version)
        ctx.set_min_proto_version(0)
    return ctx


def test_handshake_serves_the_sni_certificate_with_chain_and_alpn(ca):
    """A real handshake gets the certificate SNI asks for (chain included), verified, ALPN http/1.1."""
    section = served(ca, ("first", ["a.example.test"]), ("wiki", ["wiki.example.test"]))
    options = https.SNIServerOptions(section["certificates"])
    for sni, expected in ((b"wiki.example.test", "wiki"), (b"a.example.test", "first"), (None, "first"),
                          (b"unknown.test", "first")):
        client, server = handshake(options, client_context(ca), sni)
        assert common_name(client.get_peer_certificate()) == expected, sni
        assert [common_name(c) for c in client.get_peer_cert_chain()][-1] == "test CA"
        assert client.get_alpn_proto_negotiated() == b"http/1.1"
        assert client.get_protocol_version_name() in ("TLSv1.2", "TLSv1.3")


def test_tls_1_1_is_refused(ca):
    """A client that offers at most TLS 1.1 gets no handshake; the same client does complete one with a
    server that allows TLS 1.1 (so the refusal is ours)."""
    section = served(ca, ("first", ["a.example.test"]))
    client, server = handshake(https.SNIServerOptions(section["certificates"]),
                               client_context(ca, SSL.TLS1_1_VERSION), b"a.example.test")
    assert client.get_peer_certificate() is None
    permissive = https.SNIServerOptions(section["certificates"])
    ctx = permissive.contexts[id(section["certificates"].default)]
    ctx.set_min_proto_version(0)
    ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    client, server = handshake(permissive, client_context(ca, SSL.TLS1_1_VERSION), b"a.example.test")
    assert client.get_protocol_version_name() == "TLSv1.1"
