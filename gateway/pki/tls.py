"""TLS connection creators for the tunnel port, enrolment peer checks and peer identities."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime

from attrs import frozen
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    KeyPair,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
)

from gateway.errors import EnrolmentError
from gateway.pki import keys

# AES-GCM first (hardware-accelerated nearly everywhere), ChaCha20 for machines without AES-NI.
# TLS 1.3 suites are not governed by this string; OpenSSL's defaults there are all AEAD.
CIPHERS = AcceptableCiphers.fromOpenSSLCipherString(
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
_COMMON_OPTIONS = {"raiseMinimumTo": TLSVersion.TLSv1_2, "acceptableCiphers": CIPHERS}
_NEW_TOKEN = "get a new token from the service you mean to join"


USER_CN_PREFIX = "user:"


@frozen
class PeerIdentity:
    """Who a verified client certificate says the peer is."""

    connector_id: str
    serial_hex: str
    not_after: datetime
    not_before: datetime | None = None
    # "connector", or "user" for a Private Access client (CN "user:<credential id>"; the
    # credential id is then in user_credential and connector_id holds the CN as is).
    kind: str = "connector"
    user_credential: str = ""


def server_options(ca_cert: x509.Certificate, node_cert: x509.Certificate, node_key) -> CertificateOptions:
    """Server side of the tunnel port: mTLS when the client has a certificate, plain TLS to enrol."""
    ca = _x509(ca_cert)
    return CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(node_key),
        certificate=_x509(node_cert),
        # Enrolling connectors pin the CA by fingerprint, so it must travel in the chain.
        extraCertChain=[ca],
        verify=True,
        caCerts=[ca],
        # Not required: an unenrolled connector uses this same port to enrol.
        # Callers use peer_identity() to tell the two apart.
        requireCertificate=False,
        **_COMMON_OPTIONS,
    )


def https_server_options(ca_cert: x509.Certificate, node_cert: x509.Certificate, node_key) -> CertificateOptions:
    """Plain HTTPS with the node's certificate (the admin listener): no client certificate asked."""
    return CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(node_key),
        certificate=_x509(node_cert),
        # Admin clients pin the CA by the fingerprint in their token, so it travels in the chain.
        extraCertChain=[_x509(ca_cert)],
        **_COMMON_OPTIONS,
    )


def client_options(ca_cert: x509.Certificate, client_cert: x509.Certificate, client_key, server_name: str):
    """Client side of the tunnel: trusts only our CA, presents the connector certificate."""
    # optionsForClientTLS checks an IP literal against IP SANs and anything else against DNS SANs.
    return optionsForClientTLS(
        server_name,
        trustRoot=Certificate(_x509(ca_cert)),
        clientCertificate=PrivateCertificate.fromCertificateAndKeyPair(
            Certificate(_x509(client_cert)), KeyPair(crypto.PKey.from_cryptography_key(client_key))
        ),
        extraCertificateOptions=dict(_COMMON_OPTIONS),
    )


def enrolment_client_options() -> CertificateOptions:
    """Client options for enrolment: no trust roots yet; verify_enrolment_peer() decides afterwards."""
    return CertificateOptions(verify=False, **_COMMON_OPTIONS)


def verify_enrolment_peer(
    transport, ca_fingerprint: str, server_name: str, now: datetime | None = None
) -> x509.Certificate:
    """Check the enrolment peer against the token's CA fingerprint; return that CA certificate."""
    chain = _peer_chain(transport)
    ca = _find_ca(chain, ca_fingerprint)
    leaf = chain[0]
    _check_issued_by(leaf, ca, ca_fingerprint)
    now = now or datetime.now(UTC)
    _check_dates(ca, "the service's CA certificate", now)
    _check_dates(leaf, "the service's certificate", now)
    _check_name(leaf, server_name)
    return ca


def presents_ca(transport, ca_fingerprint: str) -> bool:
    """Whether the TLS peer's chain holds the CA ``ca_fingerprint`` pins (a TLS-inspecting proxy's does not)."""
    chain = transport.getHandle().get_peer_cert_chain() or []
    wanted = _normalise_fingerprint(ca_fingerprint)
    return any(keys.fingerprint(c.to_cryptography()) == wanted for c in chain)


def probe_client_options(client_cert: x509.Certificate, client_key) -> CertificateOptions:
    """Client options for `gateway diagnose`: presents the connector's certificate but trusts
    nothing yet, so the certificate the service presented can be examined and described
    (check_service_certificate) rather than only refused."""
    return CertificateOptions(privateKey=crypto.PKey.from_cryptography_key(client_key),
                              certificate=_x509(client_cert), verify=False, **_COMMON_OPTIONS)


def check_service_certificate(leaf: x509.Certificate, server_name: str, now: datetime) -> None:
    """EnrolmentError if the service's certificate is out of its dates or not for ``server_name``."""
    _check_dates(leaf, "the service's certificate", now)
    _check_name(leaf, server_name)


def peer_identity(transport) -> PeerIdentity | None:
    """The connector a TLS peer proved to be, or None if it sent no certificate (enrolment)."""
    peer = transport.getPeerCertificate()
    if peer is None:
        return None
    cert = peer.to_cryptography()
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        return None
    common_name = str(names[0].value)
    if common_name.startswith(USER_CN_PREFIX):
        return PeerIdentity(connector_id=common_name, serial_hex=keys.serial_hex(cert),
                            not_after=cert.not_valid_after_utc, not_before=cert.not_valid_before_utc,
                            kind="user", user_credential=common_name[len(USER_CN_PREFIX):])
    return PeerIdentity(
        connector_id=common_name,
        serial_hex=keys.serial_hex(cert),
        not_after=cert.not_valid_after_utc,
        not_before=cert.not_valid_before_utc,
    )


def _x509(cert: x509.Certificate) -> crypto.X509:
    return crypto.X509.from_cryptography(cert)


def _peer_chain(transport) -> list[x509.Certificate]:
    chain = transport.getHandle().get_peer_cert_chain()
    if not chain:
        raise EnrolmentError(
            "the service presented no certificate: check that the address is the service's tunnel port"
        )
    return [c.to_cryptography() for c in chain]


def _find_ca(chain: list[x509.Certificate], ca_fingerprint: str) -> x509.Certificate:
    wanted = _normalise_fingerprint(ca_fingerprint)
    for cert in chain:
        if keys.fingerprint(cert) == wanted:
            return cert
    raise EnrolmentError(
        f"the service presented no CA with fingerprint {_short(wanted)} "
        f"(the token was made for another service, or someone is in the middle): {_NEW_TOKEN}"
    )


def _check_issued_by(leaf: x509.Certificate, ca: x509.Certificate, ca_fingerprint: str) -> None:
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise EnrolmentError(
            f"the service's certificate was not issued by the CA {_short(ca_fingerprint)} it presented "
            f"(someone may be in the middle, or the service is misconfigured): {_NEW_TOKEN}, "
            "and ask its admin to check the service certificate"
        ) from None


def _check_dates(cert: x509.Certificate, what: str, now: datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise EnrolmentError(
            f"{what} is not valid before {cert.not_valid_before_utc.isoformat()}: "
            "check the clocks on both machines"
        )
    if now > cert.not_valid_after_utc:
        raise EnrolmentError(
            f"{what} expired at {cert.not_valid_after_utc.isoformat()}: "
            "ask the service's admin to renew it, or check this machine's clock"
        )


def _check_name(leaf: x509.Certificate, server_name: str) -> None:
    try:
        if _is_ip(server_name):
            verify_certificate_ip_address(leaf, server_name)
        else:
            verify_certificate_hostname(leaf, server_name)
    except (VerificationError, CertificateError):
        raise EnrolmentError(
            f"the service's certificate is not valid for {server_name!r}: connect with a name the "
            "service's certificate lists (its node names), or ask its admin to add this one"
        ) from None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _normalise_fingerprint(fingerprint: str) -> str:
    return keys.FINGERPRINT_PREFIX + fingerprint.lower().removeprefix(keys.FINGERPRINT_PREFIX)


def _short(fingerprint: str) -> str:
    # Enough to recognise, short enough to read in a log line.
    return _normalise_fingerprint(fingerprint)[: len(keys.FINGERPRINT_PREFIX) + 16] + "…"
