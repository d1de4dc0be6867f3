"""Real in-memory TLS handshakes against gateway.pki.tls's connection creators."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import attrs
import pytest
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from zope.interface import implementer

from gateway.errors import EnrolmentError
from gateway.pki import keys
from gateway.pki.ca import CertificateAuthority
from gateway.pki.tls import (
    PeerIdentity,
    client_options,
    enrolment_client_options,
    peer_identity,
    server_options,
    verify_enrolment_peer,
)

from components import by_nature

NOW = datetime.now(UTC)
CLIENT_HELLO = b"from client"
SERVER_HELLO = b"from server"


class Recorder(Protocol):
    """Greets the peer once connected and records what arrives and how it ended."""

    def __init__(self, greeting: bytes) -> None:
        self.greeting = greeting
        self.received = b""
        self.lost = None

    def connectionMade(self) -> None:
        self.transport.write(self.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.lost = reason


@attrs.frozen
class Connection:
    server: Recorder
    client: Recorder

    @property
    def both_talked(self) -> bool:
        return self.server.received == CLIENT_HELLO and self.client.received == SERVER_HELLO


def handshake(server_creator, client_creator) -> Connection:
    """Connect a TLS client and server in memory and run the conversation to the end."""
    server, client = Recorder(SERVER_HELLO), Recorder(CLIENT_HELLO)
    clock = Clock()
    server_factory = TLSMemoryBIOFactory(
        server_creator, isClient=False, wrappedFactory=Factory.forProtocol(lambda: server), clock=clock
    )
    client_factory = TLSMemoryBIOFactory(
        client_creator, isClient=True, wrappedFactory=Factory.forProtocol(lambda: client), clock=clock
    )
    _, _, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None), clock=clock
    )
    pump.flush()
    return Connection(server, client)


@attrs.frozen
class Pki:
    ca: CertificateAuthority
    node_cert: object
    node_key: object

    def server(self):
        return server_options(self.ca.cert, self.node_cert, self.node_key)

    def client_cert(self, connector_id: str = "conn-1"):
        key = keys.generate_key()
        csr = keys.make_csr(key, connector_id)
        return self.ca.issue_client_certificate(csr, connector_id, NOW, timedelta(days=30)), key

    def client(self, server_name: str = "localhost", trusted_ca=None, signer: Pki | None = None):
        cert, key = (signer or self).client_cert()
        return client_options((trusted_ca or self.ca).cert, cert, key, server_name)


def make_pki() -> Pki:
    ca = CertificateAuthority.create(NOW)
    node_cert, node_key = ca.issue_node_certificate(["localhost", "127.0.0.1"], NOW)
    return Pki(ca, node_cert, node_key)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


@pytest.fixture(scope="module")
def other() -> Pki:
    return make_pki()


@pytest.mark.parametrize("server_name", ["localhost", "127.0.0.1"])
def test_mutual_tls_succeeds_and_identifies_the_connector(pki, server_name):
    """A client with a certificate from our CA talks to the server by DNS name or IP, and is identified."""
    cert, key = pki.client_cert("conn-42")
    conn = handshake(pki.server(), client_options(pki.ca.cert, cert, key, server_name))
    assert conn.both_talked
    assert peer_identity(conn.server.transport) == PeerIdentity(
        connector_id="conn-42", serial_hex=keys.serial_hex(cert), not_after=cert.not_valid_after_utc,
        not_before=cert.not_valid_before_utc,
    )


@pytest.mark.parametrize("server_name", ["gw.example", "127.0.0.2"])
def test_client_refuses_a_server_name_not_in_the_certificate(pki, server_name):
    """The client checks the server name against the node certificate's DNS and IP SANs."""
    conn = handshake(pki.server(), pki.client(server_name))
    assert conn.client.received == b"" and conn.server.received == b""
    assert conn.client.lost is not None


def test_server_rejects_client_certificate_from_another_ca(pki, other):
    """A client certificate our CA did not issue fails the handshake; the server hears nothing."""
    conn = handshake(pki.server(), pki.client(signer=other))
    assert conn.server.received == b""
    assert conn.server.lost.check(SSL.Error)


def test_client_pinned_to_another_ca_rejects_the_server(pki, other):
    """A client trusting only another CA refuses our server and receives nothing from it."""
    conn = handshake(pki.server(), pki.client(trusted_ca=other.ca))
    assert conn.client.received == b""
    assert conn.client.lost.check(SSL.Error)


def test_client_without_certificate_can_enrol(pki):
    """A client with no certificate completes the handshake; the server sees no identity."""
    conn = handshake(pki.server(), enrolment_client_options())
    assert conn.both_talked
    assert peer_identity(conn.server.transport) is None


@pytest.mark.parametrize("fingerprint_case", [str, str.upper])
def test_verify_enrolment_peer_accepts_the_pinned_ca(pki, fingerprint_case):
    """With the token's fingerprint and a listed server name, the CA certificate is returned."""
    conn = handshake(pki.server(), enrolment_client_options())
    fingerprint = "sha256:" + fingerprint_case(pki.ca.fingerprint.removeprefix("sha256:"))
    for name in ("localhost", "127.0.0.1"):
        assert verify_enrolment_peer(conn.client.transport, fingerprint, name) == pki.ca.cert


def test_verify_enrolment_peer_refuses_another_fingerprint(pki, other):
    """A token made for another service's CA is refused, with advice to get a new token."""
    conn = handshake(pki.server(), enrolment_client_options())
    with pytest.raises(EnrolmentError, match="no CA with fingerprint sha256:.*get a new token"):
        verify_enrolment_peer(conn.client.transport, other.ca.fingerprint, "localhost")


@pytest.mark.parametrize("server_name", ["gw.example", "10.0.0.1"])
def test_verify_enrolment_peer_refuses_wrong_server_name(pki, server_name):
    """A server name (DNS or IP) absent from the node certificate is refused."""
    conn = handshake(pki.server(), enrolment_client_options())
    with pytest.raises(EnrolmentError, match="not valid for"):
        verify_enrolment_peer(conn.client.transport, pki.ca.fingerprint, server_name)


def test_verify_enrolment_peer_refuses_expired_certificate(pki):
    """A node certificate past its not_after is refused even when the CA matches."""
    conn = handshake(pki.server(), enrolment_client_options())
    later = NOW + timedelta(days=91)
    with pytest.raises(EnrolmentError, match="service's certificate expired at"):
        verify_enrolment_peer(conn.client.transport, pki.ca.fingerprint, "localhost", now=later)


def test_verify_enrolment_peer_refuses_leaf_not_issued_by_pinned_ca(pki, other):
    """A server that shows our CA in its chain but a leaf from another CA is refused."""
    impostor = CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(other.node_key),
        certificate=crypto.X509.from_cryptography(other.node_cert),
        extraCertChain=[crypto.X509.from_cryptography(pki.ca.cert)],
    )
    conn = handshake(impostor, enrolment_client_options())
    with pytest.raises(EnrolmentError, match="not issued by the CA"):
        verify_enrolment_peer(conn.client.transport, pki.ca.fingerprint, "localhost")


def test_server_prefers_aes_gcm_for_tls12(pki):
    """A TLS 1.2 client offering CBC before GCM still gets an AES-GCM suite."""
    client = CertificateOptions(
        lowerMaximumSecurityTo=TLSVersion.TLSv1_2,
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(
            "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256"
        ),
    )
    conn = handshake(pki.server(), client)
    assert conn.both_talked
    handle = conn.server.transport.getHandle()
    assert handle.get_protocol_version_name() == "TLSv1.2"
    assert handle.get_cipher_name() == "ECDHE-ECDSA-AES128-GCM-SHA256"


def test_server_refuses_cbc_only_client(pki):
    """A TLS 1.2 client offering only CBC suites finds no common cipher."""
    client = CertificateOptions(
        lowerMaximumSecurityTo=TLSVersion.TLSv1_2,
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString("ECDHE-ECDSA-AES128-SHA"),
    )
    conn = handshake(pki.server(), client)
    assert conn.server.received == b""
    assert conn.server.lost.check(SSL.Error)


@implementer(IOpenSSLClientConnectionCreator)
class OldTLSClient:
    """A TLS 1.1-only client; Twisted's options cannot go this low, so raw pyOpenSSL."""

    def __init__(self, version: int) -> None:
        self.context = _old_tls_context(version)

    def clientConnectionForTLS(self, tls_protocol):
        return SSL.Connection(self.context, None)


def _old_tls_context(version: int) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(version)
    ctx.set_max_proto_version(version)
    # Security level 0 re-enables the SHA-1 signatures TLS 1.1 needs.
    ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    return ctx


@implementer(IOpenSSLServerConnectionCreator)
class PermissiveServer:
    """Control server that accepts TLS 1.1, to prove OldTLSClient can connect at all."""

    def __init__(self, pki: Pki) -> None:
        self.context = _old_tls_context(SSL.TLS1_1_VERSION)
        self.context.use_certificate(crypto.X509.from_cryptography(pki.node_cert))
        self.context.use_privatekey(crypto.PKey.from_cryptography_key(pki.node_key))

    def serverConnectionForTLS(self, tls_protocol):
        return SSL.Connection(self.context, None)


def test_tls11_client_is_refused(pki):
    """A TLS 1.1 client that a permissive server accepts is refused by server_options."""
    control = handshake(PermissiveServer(pki), OldTLSClient(SSL.TLS1_1_VERSION))
    if not control.both_talked:
        by_nature("this OpenSSL build cannot speak TLS 1.1 at all")
    conn = handshake(pki.server(), OldTLSClient(SSL.TLS1_1_VERSION))
    assert conn.server.received == b""
    assert conn.server.lost.check(SSL.Error)
