"""A throwaway certificate authority for tests: a CA certificate on disk and server certificates
issued into files (or straight into an ``ssl`` server context).

One class for the unit tests (tests/unit/test_http_https.py checks certificate files and SNI in
memory) and the integration tests (the HTTPS front door, back-end TLS on the connector, the
browser). pyproject.toml puts tests/support on pytest's ``pythonpath``.
"""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class Issued(NamedTuple):
    """The files of one issued certificate: unpacks as ``cert, key``."""

    cert: str
    key: str

    def as_table(self) -> dict[str, str]:
        """``{"cert": ..., "key": ...}``: one entry of [[http.certificates]]."""
        return {"cert": self.cert, "key": self.key}


class CA:
    """A CA named ``name`` (its common name), valid from a day ago for 30 days, whose certificate
    is written to ``directory/<name>.pem`` (spaces as dashes); `issue` writes certificates beside it."""

    def __init__(self, directory: Path, name: str = "test CA") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.now = datetime.now(UTC)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = (
            x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(self.now - timedelta(days=1)).not_valid_after(self.now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem_path = directory / f"{name.replace(' ', '-')}.pem"
        self.pem_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, label: str, names: list[str], days: int = 10, start_days: int = -1, chain: bool = True,
              key: ec.EllipticCurvePrivateKey | None = None, file: str | None = None) -> Issued:
        """A server certificate with common name `label` and `names` as its DNS subjectAltNames (none
        when empty), valid from `start_days` to `days` days from the CA's creation, written with the
        CA certificate after it when `chain`, to ``<file or label>.crt`` and its key (a new one unless
        given) to ``.key``."""
        key = key or ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder().subject_name(_name(label)).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(self.now + timedelta(days=start_days)).not_valid_after(self.now + timedelta(days=days))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                                            critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path, key_path = self.dir / f"{file or label}.crt", self.dir / f"{file or label}.key"
        # key first: a service reloading meanwhile never sees a new certificate beside an old key for long
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                              + (self.cert.public_bytes(serialization.Encoding.PEM) if chain else b""))
        return Issued(str(cert_path), str(key_path))

    def server_context(self, hostname: str) -> ssl.SSLContext:
        """An ``ssl`` server context serving a certificate for `hostname` (the leaf alone, no chain)."""
        issued = self.issue(hostname, [hostname], chain=False)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(issued.cert, issued.key)
        return context
