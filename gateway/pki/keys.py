"""Key, CSR and certificate encoding helpers, plus the only file writes in gateway.pki."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

FINGERPRINT_PREFIX = "sha256:"


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A new ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: ec.EllipticCurvePrivateKey, common_name: str) -> bytes:
    """A PEM certificate signing request for `key` with subject CN=common_name."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def key_pem(key) -> bytes:
    """Unencrypted PKCS#8 PEM: the file mode, not a passphrase, protects it."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    """The certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def load_cert(pem: bytes) -> x509.Certificate:
    """Parse one PEM certificate."""
    return x509.load_pem_x509_certificate(pem)


def load_key(pem: bytes):
    """Parse one unencrypted PEM private key."""
    return serialization.load_pem_private_key(pem, password=None)


def fingerprint(cert: x509.Certificate) -> str:
    """`sha256:<64 hex>` of the DER encoding, as printed in enrolment tokens."""
    der = cert.public_bytes(serialization.Encoding.DER)
    return FINGERPRINT_PREFIX + hashlib.sha256(der).hexdigest()


def serial_hex(cert: x509.Certificate) -> str:
    """The serial number as lowercase hex: the form the store and PeerIdentity use."""
    return format(cert.serial_number, "x")


def write_private(path: Path | str, data: bytes) -> None:
    """Atomically write a secret file that is never readable by others, not even briefly."""
    _write_atomic(Path(path), data, 0o600)


def write_public(path: Path | str, data: bytes) -> None:
    """Atomically write a world-readable file (0644)."""
    _write_atomic(Path(path), data, 0o644)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    # mkstemp creates the file 0600, so a secret never exists with a wider mode;
    # the rename makes readers see either the old file or the complete new one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # explicit: the umask must not decide
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(path.parent)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(directory: Path) -> None:
    # Without this the rename itself may be lost on power failure.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
