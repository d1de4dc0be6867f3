"""Tests for gateway.pki.keys, gateway.pki.ca and gateway.pki.tokens."""

from __future__ import annotations

import base64
import ipaddress
import os
import stat
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import EnrolmentError, GatewayError
from gateway.pki import keys
from gateway.pki.ca import CertificateAuthority
from gateway.pki.tokens import EnrolmentToken, hash_secret, secret_matches

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(NOW)


def _ext(cert: x509.Certificate, kind):
    return cert.extensions.get_extension_for_class(kind).value


def _cn(cert: x509.Certificate) -> list[str]:
    return [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


# keys.py


def test_key_and_cert_pem_round_trip(ca):
    """PEM encoding then loading gives back an equal key and certificate."""
    key = keys.generate_key()
    assert keys.load_key(keys.key_pem(key)).private_numbers() == key.private_numbers()
    assert keys.load_cert(keys.cert_pem(ca.cert)) == ca.cert


def test_generate_key_is_p256():
    """Generated keys are ECDSA on P-256, as the contract promises."""
    assert isinstance(keys.generate_key().curve, ec.SECP256R1)


def test_csr_is_signed_and_names_the_common_name():
    """make_csr produces a validly signed CSR whose subject is just the given CN."""
    csr = x509.load_pem_x509_csr(keys.make_csr(keys.generate_key(), "conn-1"))
    assert csr.is_signature_valid
    assert [a.value for a in csr.subject] == ["conn-1"]


def test_fingerprint_is_sha256_of_der(ca):
    """The fingerprint is 'sha256:' plus the sha256 hex of the DER certificate."""
    expected = "sha256:" + ca.cert.fingerprint(hashes.SHA256()).hex()
    assert keys.fingerprint(ca.cert) == expected
    assert len(expected) == len("sha256:") + 64


def test_write_private_is_0600_even_with_permissive_umask(tmp_path):
    """A private file is mode 0600 regardless of the process umask."""
    old = os.umask(0)
    try:
        keys.write_private(tmp_path / "k", b"secret")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert (tmp_path / "k").read_bytes() == b"secret"


def test_write_public_is_0644_and_replaces(tmp_path):
    """A public file is 0644 and a second write replaces the content without temp files left."""
    keys.write_public(tmp_path / "c", b"one")
    keys.write_public(tmp_path / "c", b"two")
    assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == 0o644
    assert (tmp_path / "c").read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


# ca.py


def test_ca_certificate_is_a_ten_year_pathlen_0_ca(ca):
    """The CA is self-signed, CA:true pathlen 0, may sign certs and CRLs, and lasts ten years."""
    basic = _ext(ca.cert, x509.BasicConstraints)
    usage = _ext(ca.cert, x509.KeyUsage)
    assert (basic.ca, basic.path_length) == (True, 0)
    assert usage.key_cert_sign and usage.crl_sign
    ca.cert.verify_directly_issued_by(ca.cert)
    assert ca.cert.not_valid_after_utc - NOW == timedelta(days=3650)


def test_load_or_create_creates_then_loads_same_ca(tmp_path):
    """The first call writes ca.pem and a 0600 ca.key; the second loads the same CA."""
    first = CertificateAuthority.load_or_create(tmp_path)
    second = CertificateAuthority.load_or_create(tmp_path)
    assert second.fingerprint == first.fingerprint
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    assert first.fingerprint.startswith("sha256:")


def test_load_or_create_refuses_a_lone_certificate(tmp_path):
    """With ca.pem but no ca.key it refuses rather than silently making a new CA."""
    CertificateAuthority.load_or_create(tmp_path)
    (tmp_path / "ca.key").unlink()
    with pytest.raises(GatewayError, match="ca.key is missing"):
        CertificateAuthority.load_or_create(tmp_path)


def test_load_or_create_refuses_mismatched_key(tmp_path):
    """A ca.key that does not match ca.pem is reported, not used."""
    CertificateAuthority.load_or_create(tmp_path)
    keys.write_private(tmp_path / "ca.key", keys.key_pem(keys.generate_key()))
    with pytest.raises(GatewayError, match="does not belong"):
        CertificateAuthority.load_or_create(tmp_path)


def test_node_certificate_has_ip_and_dns_sans_and_server_auth(ca):
    """Node names become IP SANs when they parse as addresses and DNS SANs otherwise."""
    cert, key = ca.issue_node_certificate(["gw.example", "127.0.0.1", "::1"], NOW)
    san = _ext(cert, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["gw.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert list(_ext(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.public_key() == key.public_key()
    cert.verify_directly_issued_by(ca.cert)
    assert cert.not_valid_after_utc == NOW + timedelta(days=90)


def test_client_certificate_takes_identity_from_argument_not_csr(ca):
    """The client cert names only connector_id, whatever CN the CSR asked for."""
    key = keys.generate_key()
    cert = ca.issue_client_certificate(keys.make_csr(key, "admin"), "conn-7", NOW, timedelta(days=30))
    assert _cn(cert) == ["conn-7"]
    assert len(cert.subject) == 1
    assert list(_ext(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert _ext(cert, x509.BasicConstraints).ca is False
    assert cert.public_key() == key.public_key()
    cert.verify_directly_issued_by(ca.cert)


def test_client_certificates_get_distinct_serials(ca):
    """Two certificates for the same CSR get different random serials."""
    csr = keys.make_csr(keys.generate_key(), "x")
    a = ca.issue_client_certificate(csr, "c", NOW, timedelta(days=1))
    b = ca.issue_client_certificate(csr, "c", NOW, timedelta(days=1))
    assert a.serial_number != b.serial_number
    assert keys.serial_hex(a) == format(a.serial_number, "x")


def test_client_certificate_refuses_garbage_csr(ca):
    """An unparsable CSR is an EnrolmentError, not a crash."""
    with pytest.raises(EnrolmentError, match="unreadable certificate request"):
        ca.issue_client_certificate(b"not a csr", "c", NOW, timedelta(days=1))


def test_client_certificate_refuses_csr_with_bad_signature(ca):
    """A CSR whose public key was swapped after signing is refused."""
    signed = x509.load_pem_x509_csr(keys.make_csr(keys.generate_key(), "c"))
    other = x509.load_pem_x509_csr(keys.make_csr(keys.generate_key(), "c"))
    # Splice the other CSR's signature into this one: same structure, wrong signature.
    tampered = signed.tbs_certrequest_bytes
    der = _csr_der(tampered, other.signature)
    pem = b"-----BEGIN CERTIFICATE REQUEST-----\n" + _b64(der) + b"\n-----END CERTIFICATE REQUEST-----\n"
    with pytest.raises(EnrolmentError, match="not signed by its own key"):
        ca.issue_client_certificate(pem, "c", NOW, timedelta(days=1))


def test_client_certificate_refuses_weak_rsa_key(ca):
    """A 1024-bit RSA key is refused as too weak."""
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    csr = keys.make_csr(weak, "c")
    with pytest.raises(EnrolmentError, match="too weak"):
        ca.issue_client_certificate(csr, "c", NOW, timedelta(days=1))


def _b64(der: bytes) -> bytes:
    return base64.encodebytes(der).strip()


def _csr_der(tbs: bytes, signature: bytes) -> bytes:
    # SEQUENCE { tbs, AlgorithmIdentifier ecdsa-with-SHA256, BIT STRING signature }
    alg = bytes.fromhex("300a06082a8648ce3d040302")
    bits = _tlv(0x03, b"\x00" + signature)
    return _tlv(0x30, tbs + alg + bits)


def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + body


# tokens.py

FP = "sha256:" + "ab" * 32


def test_token_round_trips_through_text():
    """encode then parse gives back the same token."""
    token = EnrolmentToken.generate(FP)
    text = token.encode()
    assert text.startswith("gw1.") and text.endswith("ab" * 32)
    assert EnrolmentToken.parse(text) == token


def test_generated_tokens_differ():
    """Two generated tokens share neither id nor secret."""
    a, b = EnrolmentToken.generate(FP), EnrolmentToken.generate(FP)
    assert a.token_id != b.token_id and a.secret != b.secret


def test_parse_tolerates_surrounding_whitespace_and_uppercase_fingerprint():
    """Copy-paste artefacts (newline, uppercase hex) do not break parsing."""
    token = EnrolmentToken.generate(FP)
    text = token.encode()
    head, fp_hex = text.rsplit(".", 1)
    assert EnrolmentToken.parse(f"  {head}.{fp_hex.upper()}\n") == token


@pytest.mark.parametrize(
    ("mangle", "complaint"),
    [
        (lambda t: t.rsplit(".", 1)[0], "expected 4 parts"),
        (lambda t: "gw2" + t[3:], "does not start with 'gw1.'"),
        (lambda t: t.replace(t.split(".")[1], "XYZ"), "the id"),
        (lambda t: t.replace(t.split(".")[2], t.split(".")[2][:-1] + "!"), "the secret"),
        (lambda t: t[:-1], "the CA fingerprint"),
    ],
)
def test_parse_names_the_bad_part_without_echoing_the_secret(mangle, complaint):
    """Each malformed part gets its own message, and the secret never appears in it."""
    token = EnrolmentToken.generate(FP)
    with pytest.raises(EnrolmentError, match=complaint) as info:
        EnrolmentToken.parse(mangle(token.encode()))
    assert token.secret[:10] not in str(info.value)


@given(st.text(max_size=200))
def test_parse_only_ever_raises_enrolment_error(text):
    """Arbitrary input either parses or raises EnrolmentError, never anything else."""
    try:
        EnrolmentToken.parse(text)
    except EnrolmentError:
        pass


def test_secret_matches_only_its_own_hash():
    """The stored hash accepts the right secret and refuses any other."""
    hashed = hash_secret("right")
    assert secret_matches("right", hashed)
    assert not secret_matches("wrong", hashed)
    assert hashed != "right" and len(hashed) == 64
