"""The service's private certificate authority: node (server) and connector (client) certificates."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from pathlib import Path

from attrs import frozen
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import EnrolmentError, GatewayError
from gateway.pki import keys
from gateway.pki.tls import USER_CN_PREFIX

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
CA_LIFETIME = timedelta(days=3650)
# Certificates start a little in the past so a peer whose clock lags ours accepts them.
CLOCK_SKEW = timedelta(minutes=5)
_ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1)
_MIN_RSA_BITS = 2048


@frozen
class CertificateAuthority:
    """The CA certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def load_or_create(cls, state_dir: Path | str, now: datetime | None = None) -> CertificateAuthority:
        """Load ca.pem/ca.key from state_dir, creating both on first use."""
        state_dir = Path(state_dir)
        cert_path, key_path = state_dir / CA_CERT_FILE, state_dir / CA_KEY_FILE
        if cert_path.exists() and key_path.exists():
            return cls._load(cert_path, key_path)
        if cert_path.exists() or key_path.exists():
            raise GatewayError(_half_ca_message(cert_path, key_path))
        ca = cls.create(now or datetime.now(UTC))
        # Key first: a crash in between leaves a lone key, which the check above reports.
        keys.write_private(key_path, keys.key_pem(ca.key))
        keys.write_public(cert_path, keys.cert_pem(ca.cert))
        return ca

    @classmethod
    def create(cls, now: datetime, common_name: str = "gateway CA") -> CertificateAuthority:
        """A new self-signed CA valid for ten years from `now`."""
        key = keys.generate_key()
        name = _name(common_name)
        cert = (
            _builder(name, name, key.public_key(), now - CLOCK_SKEW, now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def _load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        cert = keys.load_cert(cert_path.read_bytes())
        key = keys.load_key(key_path.read_bytes())
        if cert.public_key() != key.public_key():
            raise GatewayError(
                f"{key_path} does not belong to {cert_path}: restore the matching pair from backup"
            )
        return cls(cert, key)

    @property
    def fingerprint(self) -> str:
        """`sha256:<hex>` of the CA certificate: what enrolment tokens pin."""
        return keys.fingerprint(self.cert)

    def issue_node_certificate(
        self, names: list[str], now: datetime, lifetime: timedelta = timedelta(days=90)
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A server certificate and new key for the service, valid for `names` (DNS names or IPs)."""
        if not names:
            raise ValueError("a node certificate needs at least one name")
        key = keys.generate_key()
        cert = (
            self._issued(_name(names[0]), key.public_key(), now, lifetime)
            .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert, key

    def issue_client_certificate(
        self, csr_pem: bytes, connector_id: str, now: datetime, lifetime: timedelta
    ) -> x509.Certificate:
        """A connector certificate for the key in `csr_pem`, naming only `connector_id`."""
        public_key = _checked_csr_key(csr_pem)
        # The subject is ours, never the CSR's: the connector must not choose its identity.
        return (
            self._issued(_name(connector_id), public_key, now, lifetime)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def issue_user_certificate(
        self, csr_pem: bytes, credential_id: str, now: datetime, lifetime: timedelta
    ) -> x509.Certificate:
        """A Private Access user's certificate for the key in `csr_pem`: CN ``user:<credential id>``.

        The credential (a personal token or a browser sign-in, in the store) says who the user
        is; the certificate only proves which credential a tunnel belongs to, so revoking the
        credential cuts the tunnel whatever the certificate's dates.
        """
        public_key = _checked_csr_key(csr_pem)
        return (
            self._issued(_name(USER_CN_PREFIX + credential_id), public_key, now, lifetime)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def _issued(self, subject: x509.Name, public_key, now: datetime, lifetime: timedelta):
        return (
            # Short-lived certificates back-date less, so most of their life lies ahead.
            _builder(subject, self.cert.subject, public_key, now - min(CLOCK_SKEW, lifetime / 10), now + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )


def _checked_csr_key(csr_pem: bytes):
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        public_key = csr.public_key()
        signed = csr.is_signature_valid
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise EnrolmentError(
            f"the connector sent an unreadable certificate request ({e}): "
            "upgrade the connector or report a bug"
        ) from None
    if not signed:
        raise EnrolmentError(
            "the connector's certificate request is not signed by its own key: "
            "the request was altered or the connector is broken; enrol again"
        )
    _check_key_strength(public_key)
    return public_key


def _check_key_strength(public_key) -> None:
    if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, _ACCEPTED_CURVES):
        return
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size >= _MIN_RSA_BITS:
        return
    raise EnrolmentError(
        "the connector's key is too weak or of an unsupported type "
        f"(accepted: EC P-256/P-384, RSA >= {_MIN_RSA_BITS} bits): upgrade the connector"
    )


def _builder(subject, issuer, public_key, not_before, not_after) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _half_ca_message(cert_path: Path, key_path: Path) -> str:
    present, missing = (cert_path, key_path) if cert_path.exists() else (key_path, cert_path)
    return (
        f"{present} exists but {missing} is missing: restore it from backup; "
        "only if the CA is lost for good, remove both files to create a new CA "
        "(every connector must then enrol again)"
    )
